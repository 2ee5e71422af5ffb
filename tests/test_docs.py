"""The docs name what the code holds: every source file in the README's layout and in ARCHITECTURE.md's
table, every run setting in the README's list of them, and no path the repository does not have."""

import re
from dataclasses import fields
from pathlib import Path

from progsae.study.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "progsae"
README = (ROOT / "README.md").read_text()
ARCH = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
SOURCES = sorted(p.relative_to(SRC) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def layout_block() -> str:
    return README.split("## Layout", 1)[1].split("```")[1]


def test_the_readme_layout_lists_every_source_file_under_its_folder():
    """The layout block: a line per folder (`src/progsae/data/ ...`), continued on indented lines."""
    folders: dict[str, str] = {}
    for line in layout_block().splitlines():
        if line and not line[0].isspace():
            folder = line.split()[0]
            folders[folder] = line[len(folder) :]
        elif line.strip():
            folders[folder] += " " + line
    missing = [str(rel) for rel in SOURCES
               if not re.search(rf"(^|\s){re.escape(rel.name)}(\s|$)", folders.get(f"src/progsae/{rel.parent}/".replace("/./", "/"), ""))]  # fmt: skip
    assert not missing, f"README layout misses {missing}"


def test_the_readme_names_every_run_setting():
    listed = re.search(r"fields\s+of\s+`progsae\.study\.config\.RunConfig`:([^;]*);", README)[1]
    names = {n.strip() for n in re.split(r",", listed) if n.strip()}
    assert names == {f.name for f in fields(RunConfig)}


def test_architecture_describes_every_source_file_and_cites_no_missing_path():
    missing = [str(rel) for rel in SOURCES if f"`src/progsae/{rel}`" not in ARCH]
    assert not missing, f"ARCHITECTURE.md's source table misses {missing}"
    for doc, text in (("README.md", README), ("ARCHITECTURE.md", ARCH)):
        for path in re.findall(r"`((?:src|tests|benchmarks|docs)/[\w/.-]+\.\w+)`", text):
            assert (ROOT / path).exists(), f"{doc} cites {path}, which does not exist"
