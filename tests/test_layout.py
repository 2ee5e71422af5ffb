"""The shape of the code, read with the standard library's ast: which module may import which, and sizes.

    core      errors, kernels, products, sae         imports nothing of progsae but each other
    library   files, config, dist, train, checkpoint, formats/, data/, analysis/, interp/
              imports the core and the library, never study/, report/ or cli
    study/    the run: imports anything but report/ and cli
    report/   the report's HTML and PNG: reads results through study.results (paths: study.rundir), nothing else of study/
              (report/browser.py, the feature browser of one SAE, is library: the run's interp stage writes it)
    cli       on top
A module importing progsae.a.b also imports the package progsae.a (its __init__), which the graph follows.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "progsae"
CORE = {"progsae.errors", "progsae.kernels", "progsae.products", "progsae.sae"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """The progsae modules a file imports (at any depth: lazy imports count too); `name`: the module it is."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("progsae")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("progsae"):
                continue
            for a in node.names:  # `from . import dist` imports the module progsae.dist
                sub = f"{mod}.{a.name}"
                out.add(sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").is_file() else mod)
    for dep in list(out):  # importing progsae.a.b runs progsae/a/__init__.py first
        parts = dep.split(".")
        out |= {p for i in range(2, len(parts)) if not (name + ".").startswith((p := ".".join(parts[:i])) + ".")}
    return out


GRAPH = {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def layer(mod: str) -> str:
    if mod in CORE:
        return "core"
    if mod == "progsae.report.browser":
        return "library"
    top = mod.split(".")[1] if "." in mod else ""
    return {"study": "study", "report": "report", "cli": "cli", "__main__": "cli"}.get(top, "library")


# what the report may read of the study: results.json, and where a run keeps its files
READS = {("report", "progsae.study.results"), ("report", "progsae.study.rundir")}
# packages whose __init__ imports nothing: importing one of their modules brings nothing else along
PACKAGES = ("progsae.study", "progsae.report")


def test_the_import_free_packages_import_nothing():
    for p in PACKAGES:
        assert GRAPH[p] == set(), f"{p}/__init__.py imports {GRAPH[p]}"


def test_no_import_cycle():
    """Depth-first search for a back edge over the modules (a package imports its __init__'s imports)."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            if n == m or n not in GRAPH:
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*stack[stack.index(n) :], n])
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_each_layer_imports_only_what_lies_below_it():
    allowed = {
        "core": {"core"},
        "library": {"core", "library"},
        "study": {"core", "library", "study"},
        "report": {"core", "library", "report"},
        "cli": {"core", "library", "study", "report", "cli"},
    }
    bad = []
    for m, deps in GRAPH.items():
        for d in deps:
            if d == "progsae":  # the package's own __init__ (the public API) is for users, not for its modules
                bad.append(f"{m} imports progsae")
            elif layer(d) not in allowed[layer(m)] and d not in PACKAGES and (layer(m), d) not in READS:
                bad.append(f"{m} ({layer(m)}) imports {d} ({layer(d)})")
    assert not bad, "\n".join(bad)


def test_the_core_imports_only_itself():
    for m in CORE:
        assert GRAPH[m] <= CORE, f"{m} imports {GRAPH[m] - CORE}"


def test_no_source_file_over_400_lines_and_no_class_over_250():
    long_files = {module_name(p): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long_files, long_files
    big = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                big.append(f"{module_name(p)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, big


def test_the_import_reader_sees_relative_lazy_and_module_imports(tmp_path):
    """The checks above rest on `imports`: on a planted sae.py it finds what the old SAE.load imported."""
    planted = tmp_path / "sae.py"
    planted.write_text("from .errors import ProgsaeError\nfrom . import dist\n\ndef load():\n    from .formats import load_sae\n")
    assert imports(planted, "progsae.sae") == {"progsae.errors", "progsae.dist", "progsae.formats"}
    (tmp_path / "x.py").write_text("from ..study.results import load\n")
    assert imports(tmp_path / "x.py", "progsae.report.x") == {"progsae.study.results", "progsae.study"}
    assert not imports(planted, "progsae.sae") <= CORE
