"""The paper's study as one command (`progsae run`): names, paths, stages and results of a run."""

from ..run import PRESETS, Run, RunConfig

__all__ = ["PRESETS", "Run", "RunConfig"]
