"""The layers of ``diffstat.dnc`` point down only: building blocks, then algorithms, then the
diffusion combiner, the ``combine`` front, the pipeline and the package's ``__init__``. A module
may import a ``diffstat.dnc`` module of a lower layer only (issue 14: ``dnc/diffusion.py`` reached
back into ``dnc/pipeline.py`` through ``energy.fit_shard_energies``)."""

import ast
import pathlib

import diffstat.dnc

PACKAGE = pathlib.Path(diffstat.dnc.__file__).parent

LAYERS = {
    **dict.fromkeys(["gaussian", "models", "options", "tasks", "shards"], 0),
    **dict.fromkeys(
        [
            "consensus",
            "swiss",
            "semiparametric",
            "surrogate",
            "energy",
            "mode_weights",
            "exact_smc",
            "annealing",
        ],
        1,
    ),
    "diffusion": 2,
    "combine": 3,
    "pipeline": 4,
    "__init__": 5,
}


def _dnc_imports(path: pathlib.Path) -> set[str]:
    """The ``diffstat.dnc`` modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {
            n.split(".")[2] for n in names if n.startswith("diffstat.dnc.") and n.split(".")[2] in LAYERS
        }
    return found


def test_every_module_has_a_layer():
    assert {p.stem for p in PACKAGE.glob("*.py")} <= set(LAYERS)


def test_imports_point_down():
    upward = {
        (p.stem, other)
        for p in PACKAGE.glob("*.py")
        for other in _dnc_imports(p)
        if LAYERS[other] >= LAYERS[p.stem] and other != p.stem
    }
    assert not upward, f"modules importing their own or a higher layer: {sorted(upward)}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The check can fail: a file that imports the pipeline from an algorithm's layer is caught."""
    bad = tmp_path / "energy.py"
    bad.write_text("def f():\n    from diffstat.dnc.pipeline import map_with_retries\n")
    assert _dnc_imports(bad) == {"pipeline"} and LAYERS["pipeline"] > LAYERS["energy"]
