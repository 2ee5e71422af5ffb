"""The paper's study as one command (`progsae run`): the run's settings and presets (config.py), its SAEs as
typed specs (plan.py), every path of a run directory (rundir.py), the stage runner (stages.py), the stage
graph (pipeline.py: `Run`), results.json (results.py) and the verdicts (findings.py).

Nothing is imported here, so the report can read `study.results` without loading the pipeline."""
