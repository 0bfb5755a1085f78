"""The vignettes run end to end in fast mode and write their figures.

Each vignette runs as a subprocess, as a user would run it (``python vignettes/<name>.py``), with
``DIFFSTAT_FAST=1`` (small budgets) and ``MPLBACKEND=Agg``. The test checks the exit code, that no
method reported a failure (the vignettes print ``[failed] <method>: <error>`` instead of stopping,
so that a vignette still runs while a sampler is broken), that every figure was written afresh, and
the vignettes' own checks (the tempering claim, identical shard draws on the Dask cluster).

Alone on the 2-core development machine (load 1 to 2) the three took 188 s (posterior_from_log_prob
74, compare_tempering 67, combine_subposteriors 47 s), 283 s before their fast modes trained the
learned smoothed scores of SMS and walk-jump 500 steps instead of 2,000 and drew fewer shard draws;
the fits and the populations behind them are still most of it. They are marked ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VIGNETTES = ROOT / "vignettes"
FIGURES = VIGNETTES / "figures"
#: Per-vignette wall-clock limit (seconds); generous against a loaded machine.
TIMEOUT = 600

#: Failures found in other engineers' samplers, reported to the lead: (vignette, method) -> why. A
#: listed method may print ``[failed]`` (a warning is raised instead); remove the entry once fixed.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

CASES = {
    "compare_tempering.py": {
        "figures": [
            "tempered_vs_noised_2d.png",
            "tempered_vs_noised_10d.png",
            "draws_10d.png",
            "draws_2d.png",
            "compare_tempering_table.md",
        ],
        "expect": ["-> holds"],
    },
    "posterior_from_log_prob.py": {
        "figures": [
            "posterior_trace.png",
            "posterior_pair.png",
            "posterior_marginals.png",
            "posterior_pyro_vs_torch.png",
        ],
        "expect": ["r_hat"],
    },
    "combine_subposteriors.py": {
        "figures": ["dnc_marginals.png", "combine_subposteriors_table.md"],
        "expect": ["shard draws identical to the local run: True"],
    },
}


def run_vignette(name: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, DIFFSTAT_FAST="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(VIGNETTES / name)],
        cwd=VIGNETTES,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return proc, start


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_vignette_runs_in_fast_mode(name):
    proc, start = run_vignette(name)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{output[-4000:]}"
    assert "fast mode: True" in proc.stdout
    failed = [line for line in proc.stdout.splitlines() if line.startswith("[failed]")]
    known = [line for line in failed if (name, line.split()[1].rstrip(":")) in KNOWN_FAILURES]
    for line in known:
        warnings.warn(f"{name}: known failure: {line}", stacklevel=1)
    unexpected = [line for line in failed if line not in known]
    assert not unexpected, f"{name}: methods failed:\n" + "\n".join(unexpected)
    for expected in CASES[name]["expect"]:
        assert expected in proc.stdout, f"{name}: expected {expected!r} in the output:\n{proc.stdout[-4000:]}"
    for figure in CASES[name]["figures"]:
        path = FIGURES / figure
        assert path.exists(), f"{name} did not write {path}"
        assert path.stat().st_mtime >= start - 1, f"{path} was not rewritten by this run"
        assert path.stat().st_size > 0


def test_vignettes_are_percent_notebooks():
    """Each vignette opens as a notebook (jupytext's percent format: code and markdown cells), has a
    fast mode and draws with the Agg backend."""
    jupytext = pytest.importorskip("jupytext")
    for name in CASES:
        notebook = jupytext.read(VIGNETTES / name)
        kinds = [cell.cell_type for cell in notebook.cells]
        assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3, (name, kinds)
        assert notebook.cells[0].cell_type == "markdown", name
        text = (VIGNETTES / name).read_text()
        assert 'os.environ.get("DIFFSTAT_FAST"' in text, name
        assert 'matplotlib.use("Agg")' in text, name
