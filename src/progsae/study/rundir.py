"""Every path of a run directory, in one place.

    config.json  timings.json  results.json  report.html        the run's settings, stage times, numbers, page
    acts/  acts-test/  (acts-typical/  acts-test-typical/)      extracted activations (outliers excluded)
    outliers.json  stream.json                                   norm profile; the LM stream SAEs trained on
    saes/NAME/                                                   every SAE (SAELens layout; training history)
    stats/NAME.safetensors  stats/NAME.records.safetensors       importance statistics; latent records
    eval/NAME.json                                               the evaluation of one SAE
    interp/NAME.json  interp/judge-check.json  llm-cache/        auto-interp scores, the judge's check, answers
    browse/NAME/                                                 feature browsers
    tables/*.csv  figures/*.png                                  the report's tables and figures
"""

from __future__ import annotations

from pathlib import Path


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    config = property(lambda self: self.root / "config.json")
    timings = property(lambda self: self.root / "timings.json")
    results = property(lambda self: self.root / "results.json")
    report = property(lambda self: self.root / "report.html")
    outliers = property(lambda self: self.root / "outliers.json")
    stream = property(lambda self: self.root / "stream.json")
    judge_check = property(lambda self: self.root / "interp" / "judge-check.json")
    llm_cache = property(lambda self: self.root / "llm-cache")
    tables = property(lambda self: self.root / "tables")
    figures = property(lambda self: self.root / "figures")

    def acts(self, split: str = "train", typical: bool = False) -> Path:
        """Extracted activations of a split (train or test); `typical`: with outliers excluded."""
        return self.root / (("acts" if split == "train" else "acts-test") + ("-typical" if typical else ""))

    def sae(self, name: str) -> Path:
        return self.root / "saes" / name

    def history(self, name: str) -> Path:
        return self.sae(name) / "history.json"

    def stats(self, name: str) -> Path:
        return self.root / "stats" / f"{name}.safetensors"

    def records(self, name: str) -> Path:
        return self.root / "stats" / f"{name}.records.safetensors"

    def eval(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    def interp(self, name: str) -> Path:
        return self.root / "interp" / f"{name}.json"

    def browser(self, name: str) -> Path:
        return self.root / "browse" / name
