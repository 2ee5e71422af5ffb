"""A run on synthetic activations with known answers: the stages, results.json's known_answers, the three
known-answer findings (their verdicts on planted numbers) and the report's section."""

import json
import re

import numpy as np
import pytest

from progsae import ProgsaeError
from progsae.cli import main
from progsae.study.config import RunConfig
from progsae.study.known import known_findings
from progsae.study.plan import Plan

SYNTH = {"d_in": 16, "n_features": 48, "mean_active": 4, "trees": 3, "depth": 1, "branching": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A whole `progsae run` with source synthetic at toy sizes (two seeds)."""
    w = tmp_path_factory.mktemp("synthetic-run")
    cfg = {"source": "synthetic", "synthetic": SYNTH, "train_tokens": 4000, "test_tokens": 2000, "d_sae": 64,
           "k": 4, "sae_tokens": 12000, "batch_size": 256, "matryoshka_sampled": 3, "stats_tokens": 2000,
           "rsa_tokens": 100, "lm_tokens": 0, "seeds": 2, "bootstrap": 200, "minutes_estimate": None,
           "precision": "fp32"}  # fmt: skip
    (w / "cfg.json").write_text(json.dumps(cfg))
    assert main(["run", "--config", str(w / "cfg.json"), "--out", str(w / "out")]) == 0
    return w / "out"


def test_a_synthetic_run_measures_every_family_against_the_truth_and_reports_it(run):
    res = json.loads((run / "results.json").read_text())
    ka = res["known_answers"]
    assert ka["n_features"] == 48 and ka["depth_counts"] == [39, 9] and ka["has_codes"]
    assert set(ka["families"]) == {f for f, v in res["families"].items() if v["role"] != "shrunk"}  # and they are there
    assert sum(v["role"] == "shrunk" for v in res["families"].values()) == 12
    for fam, f in ka["families"].items():  # the family's numbers are the means of its seeds' eval files
        evals = [json.loads((run / "eval" / f"{n}.json").read_text())["truth"] for n in res["families"][fam]["seeds"]]
        for i, row in enumerate(f["table"]):
            for key in ("mcc", "recovered", "recovered_parents", "f1_prefix", "f1_rescaled"):
                assert row[key] == pytest.approx(np.mean([e["table"][i][key] for e in evals]), abs=1e-12), (fam, key)
            assert row["recovered_top_decile"] == pytest.approx(np.mean([e["table"][i]["recovered_decile"][0] for e in evals]))
    papers = [f["paper"] for f in res["findings"]]
    assert sum("Bussmann" in p for p in papers) == 2 and any("mechanism" in p for p in papers)
    for f in res["findings"]:
        assert re.match(r"(reproduced|partly reproduced|not reproduced|undecided|answered)( \(|;|$)", f["verdict"]), f["verdict"]
    assert not res["interpretability"]["saes"] and all(s["lm"] is None for s in res["saes"].values())
    assert main(["run", "--config", str(run.parent / "cfg.json"), "--out", str(run)]) == 0  # resumes: all done
    page = (run / "report.html").read_text()
    assert "Known answers" in page and "Synthetic activations with known features" in page
    assert (run / "figures" / "known_recovered.png").is_file() and (run / "tables" / "known_answers.csv").is_file()


@pytest.mark.parametrize(
    "change, match",
    [({"lm_tokens": 10}, "lm_tokens must be 0"), ({"source": "cached"}, "source is not synthetic"),
     ({"synthetic": {**SYNTH, "trees": 99}}, "need"), ({"synthetic": {"colour": 1}}, "colour")],
)  # fmt: skip
def test_a_synthetic_run_config_that_cannot_work_is_refused_in_one_line(change, match):
    cfg = {"source": "synthetic", "synthetic": SYNTH, "lm_tokens": 0, **change}
    with pytest.raises(ProgsaeError, match=match) as e:
        RunConfig.from_dict(cfg)
    assert "\n" not in str(e.value)


def planted(plan, values: dict[str, dict[str, list[float]]], Gs: list[int]) -> dict:
    """known_answers with the given per-seed values (family -> key -> seeds), the same at every G."""
    fams = {}
    for fam, keys in values.items():
        rows = [{"G": G, **{f"{k}_seeds": v for k, v in keys.items()}, **{k: float(np.mean(v)) for k, v in keys.items()}}
                for G in Gs]  # fmt: skip
        fams[fam] = {"table": rows}
    return {"n_features": 10, "depth_counts": [4, 6], "has_codes": True, "families": fams}


def test_known_verdicts_follow_the_rule_in_both_modes():
    plan = Plan(RunConfig.from_dict({"source": "synthetic", "synthetic": SYNTH, "lm_tokens": 0, "d_sae": 64, "seeds": 3}))
    Gs, N = [8, 16, 32, 64], 64
    good, bad = [0.9, 0.85, 0.95], [0.4, 0.5, 0.45]
    values = {
        "topk-64-by-e_z2": {"recovered_parents": bad, "absorption_prefix": good, "absorption_rescaled": bad,
                            "recovered_top_decile": good},
        "topk-64-by-freq": {"recovered_top_decile": good},
        "topk-64": {"recovered_top_decile": bad},
        "matryoshka": {"recovered_parents": good, "absorption_prefix": bad, "absorption_rescaled": good},
        "matryoshka-sampled": {"recovered_parents": good, "absorption_prefix": bad, "absorption_rescaled": good},
    }  # fmt: skip
    found = {f["paper"][:20]: f for f in known_findings(planted(plan, values, Gs), plan, Gs)}
    parents, frequent, absorption = found["Matryoshka SAEs keep"], found["Sorting by importanc"], found["Absorption falls wit"]
    assert parents["verdict"] == "reproduced" and frequent["verdict"] == "reproduced"
    # lower absorption in prefix mode only: partly, saying which mode holds
    assert absorption["verdict"] == "partly reproduced (prefix mode: reproduced; rescaled mode: not reproduced)"
    # the fixed Matryoshka is judged at its own granularities < N only (N/4 and N/2), the sampled one at every G < N
    assert parents["ours"].count("G=8") == 1 and parents["ours"].count("G=16") == 2 and f"G={N}" not in parents["ours"]
    values["matryoshka"]["recovered_parents"] = [0.5, 0.2, 0.9]  # overlaps the permuted SAE: not certain
    found = {f["paper"][:20]: f for f in known_findings(planted(plan, values, Gs), plan, Gs)}
    assert found["Matryoshka SAEs keep"]["verdict"] == "partly reproduced"
