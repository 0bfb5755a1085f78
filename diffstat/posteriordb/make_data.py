"""Build ``data/`` from a posteriordb checkout (run once by a maintainer; never imported at run time).

    python -m diffstat.posteriordb.make_data /path/to/posteriordb/posterior_database

Writes ``data/data.npz`` (each data set's fields, ``"{data_name}/{field}"``), ``data/reference.npz``
(per posterior: ``names``, ``mean`` and ``sd`` from all 10,000 reference draws, and ``draws``, a
thinned float32 subset: every 10th draw of each of the 10 chains, 1,000 draws) and
``data/index.json`` (posterior -> model and data names, the source commit).
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

#: posteriordb commit the data come from (see LICENCE.md and README of the shared copy).
SOURCE_COMMIT = "28f8d3d6e9"
#: Thinning of the reference chains: 10 chains x 1,000 draws -> 10 x 100.
THIN = 10
#: ODE posteriors are not ported.
SKIP = ("hudson_lynx_hare-lotka_volterra", "one_comp_mm_elim_abs-one_comp_mm_elim_abs")


def _read_zip_json(path: Path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(z.namelist()[0]))


def main(root: str) -> None:
    root = Path(root)
    out = Path(__file__).parent / "data"
    index, data, ref = {}, {}, {}
    for p in sorted((root / "posteriors").glob("*.json")):
        info = json.loads(p.read_text())
        name = info["name"]
        if name in SKIP:
            continue
        index[name] = {"model": info["model_name"], "data": info["data_name"]}
        if info["data_name"] not in {k.split("/")[0] for k in data}:
            fields = _read_zip_json(root / "data" / "data" / f"{info['data_name']}.json.zip")
            for field, value in fields.items():
                data[f"{info['data_name']}/{field}"] = np.asarray(value, dtype=np.float64)
        chains = _read_zip_json(root / "reference_posteriors" / "draws" / "draws" / f"{name}.json.zip")
        names = list(chains[0])
        draws = np.stack([np.stack([np.asarray(c[k], dtype=np.float64) for k in names], -1) for c in chains])
        flat = draws.reshape(-1, len(names))
        ref[f"{name}/names"] = np.array(names)
        ref[f"{name}/mean"] = flat.mean(0)
        ref[f"{name}/sd"] = flat.std(0, ddof=1)
        ref[f"{name}/draws"] = draws[:, ::THIN].reshape(-1, len(names)).astype(np.float32)
    np.savez_compressed(out / "data.npz", **data)
    np.savez_compressed(out / "reference.npz", **ref)
    meta = {"source_commit": SOURCE_COMMIT, "posteriors": index}
    (out / "index.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
