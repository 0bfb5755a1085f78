r"""The RAND Health Insurance Experiment data (20,190 rows; public domain, copied from the
statsmodels package into ``data/randhie.csv``, provenance in ``data/README.md``) and a Poisson
regression of outpatient visits on it, the real-data problem for divide-and-conquer MCMC.

Model: :math:`\text{mdvis}_i \sim \text{Poisson}(\exp(x_i^\top\beta))`, :math:`x_i` an intercept
and the nine covariates standardised to mean 0 and sd 1, :math:`\beta \sim \mathcal N(0,
\text{prior\_variance}\, I_{10})`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["RANDHIE_COLUMNS", "load_randhie", "randhie_poisson"]

#: Response first, then the nine covariates, as in the csv.
RANDHIE_COLUMNS = ("mdvis", "lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf", "hlthp")


def _default_path() -> Path:
    env = os.environ.get("DIFFSTAT_DATA")
    candidates = ([Path(env) / "randhie.csv"] if env else []) + [
        Path(__file__).resolve().parents[2] / "data" / "randhie.csv",  # repository checkout
        Path(__file__).resolve().parent / "data" / "randhie.csv",  # shipped with the package
    ]
    for path in candidates:
        if path.exists():
            return path
    raise ValueError(
        "randhie.csv not found in "
        + ", ".join(str(c) for c in candidates)
        + "; pass path= or set DIFFSTAT_DATA"
    )


def load_randhie(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The raw data: covariates ``(20190, 9)``, response ``mdvis`` ``(20190,)`` (float64) and the
    covariate names."""
    path = Path(path) if path is not None else _default_path()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if tuple(header) != RANDHIE_COLUMNS:
        raise ValueError(f"{path} has columns {header}, expected {list(RANDHIE_COLUMNS)}")
    table = np.asarray(body, dtype=np.float64)
    return table[:, 1:], table[:, 0], RANDHIE_COLUMNS[1:]


def randhie_poisson(path=None, *, standardize: bool = True, dtype=torch.float64):
    """Design matrix with intercept ``(N, 10)``, counts ``(N,)`` and coefficient names, ready for
    :func:`diffstat.dnc.models.poisson_log_likelihood` (``data = (X, y)``)."""
    x, y, names = load_randhie(path)
    if standardize:
        x = (x - x.mean(0)) / x.std(0)
    design = np.concatenate([np.ones((x.shape[0], 1)), x], axis=1)
    return (
        torch.as_tensor(design, dtype=dtype),
        torch.as_tensor(y, dtype=dtype),
        ("intercept",) + tuple(names),
    )
