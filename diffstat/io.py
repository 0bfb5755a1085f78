"""All conversion to ArviZ lives here (ArviZ 0.x ``from_dict`` returns ``InferenceData``; 1.x
returns a DataTree with another signature, so nothing else in the package touches ArviZ).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["to_inference_data", "to_numpy", "draws_from"]


def to_numpy(value) -> np.ndarray:
    """A detached CPU numpy array from a tensor, array or number (ArviZ cannot take grad tensors)."""
    if torch.is_tensor(value):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _clean_attr(value):
    """netCDF attributes are numbers or strings: convert numpy scalars, drop None."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else to_numpy(value)
    return value


def to_inference_data(target, result, attrs: dict):
    """Build ``InferenceData`` from a :class:`~diffstat.sampling.SamplerResult`.

    ``posterior`` holds the target's variables (``target.to_posterior``), ``sample_stats`` the
    per-draw statistics, each extra group its per-stage arrays (leading dimension ``stage``), and
    ``posterior.attrs`` the run's attributes plus ``diffstat_version``.
    """
    import arviz as az
    import xarray as xr

    from diffstat import __version__

    draws = result.draws
    if draws.dim() != 3:
        raise ValueError(f"draws must be (chain, draw, dim), got {tuple(draws.shape)}")
    posterior = target.to_posterior(draws.detach())
    sample_stats = {k: to_numpy(v) for k, v in result.sample_stats.items()}
    with warnings.catch_warnings():
        # ArviZ guesses a transposed array when chains outnumber draws; ours are (chain, draw) by
        # construction (a few draws of many chains is a valid request), so the guess is only noise
        warnings.filterwarnings("ignore", "More chains", UserWarning)
        idata = az.from_dict(posterior=posterior, sample_stats=sample_stats)
    extra = {}
    for group, variables in result.groups.items():
        data_vars = {}
        for name, value in variables.items():
            arr = to_numpy(value)
            dims = ["stage"] + [f"{name}_dim_{i}" for i in range(arr.ndim - 1)]
            data_vars[name] = (dims, arr)
        extra[group] = xr.Dataset(data_vars)
    if extra:
        idata.add_groups(extra)
    all_attrs = dict(attrs)
    all_attrs["diffstat_version"] = __version__
    all_attrs = {k: _clean_attr(v) for k, v in all_attrs.items() if v is not None}
    idata.posterior.attrs.update(all_attrs)
    return idata


def draws_from(idata_or_array, var_name: str | None = None) -> torch.Tensor:
    """Draws ``(n, dim)`` flattened over chains from InferenceData with one variable, an array or
    a tensor ``(n, dim)`` (or ``(chain, draw, dim)``)."""
    if hasattr(idata_or_array, "posterior"):
        post = idata_or_array.posterior
        names = list(post.data_vars) if var_name is None else [var_name]
        if len(names) != 1:
            raise ValueError(f"InferenceData has variables {names}; pass one variable name")
        arr = post[names[0]].values
        arr = arr.reshape(arr.shape[0] * arr.shape[1], -1)
        return torch.as_tensor(arr)
    arr = torch.as_tensor(to_numpy(idata_or_array))
    if arr.dim() == 3:
        arr = arr.reshape(-1, arr.shape[-1])
    if arr.dim() == 1:
        arr = arr.unsqueeze(-1)
    if arr.dim() != 2:
        raise ValueError(f"draws must have shape (n, dim), got {tuple(arr.shape)}")
    return arr
