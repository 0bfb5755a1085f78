"""Saving and loading fitted :class:`~diffstat.diffusion.networks.ScoreMLP` and
:class:`~diffstat.diffusion.networks.EnergyMLP` models with their process and training settings.

The file holds only tensors and plain Python values under a format name and version, so that
:func:`load_model` reads it with ``torch.load(weights_only=True)`` (no code is unpickled) and
refuses foreign or newer files with a clear message.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from diffstat.diffusion.networks import EnergyMLP, ScoreMLP
from diffstat.diffusion.processes import process_from_dict
from diffstat.diffusion.train_config import TrainConfig

__all__ = ["save_model", "load_model"]

_MODEL_CLASSES = {"ScoreMLP": ScoreMLP, "EnergyMLP": EnergyMLP}
_FILE_FORMAT = "diffstat.diffusion.model"
_FILE_VERSION = 1


def save_model(path, model: torch.nn.Module, process, config: TrainConfig | None = None) -> None:
    """Save a :class:`ScoreMLP` or :class:`EnergyMLP` with its process and training settings.

    The file holds only tensors and plain Python values, so :func:`load_model` reads it with
    ``torch.load(weights_only=True)`` (no code is unpickled).
    """
    name = type(model).__name__
    if name not in _MODEL_CLASSES or not hasattr(model, "init_kwargs"):
        raise ValueError(f"save_model saves ScoreMLP or EnergyMLP models, got {name}")
    param = next(model.parameters())
    payload = {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "model_class": name,
        "model_kwargs": dict(model.init_kwargs),
        "model_uses_process": model.process is not None,
        "process": None if process is None else process.to_dict(),
        "config": None if config is None else dataclasses.asdict(config),
        "dtype": str(param.dtype).replace("torch.", ""),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if model.process is not None and process is not None and model.process.to_dict() != process.to_dict():
        raise ValueError(f"the model was built with {model.process!r} but process is {process!r}")
    torch.save(payload, path)


def load_model(path):
    """Load what :func:`save_model` wrote: returns ``(model, process, config)``, the model in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is corrupt, is not a diffstat model file, or its weights do not fit the
        recorded architecture.
    """
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{path} is not a readable diffstat model file (corrupt or not saved by save_model): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path} is not a diffstat model file (no '{_FILE_FORMAT}' header)")
    if payload.get("version") != _FILE_VERSION:
        raise ValueError(
            f"{path} has format version {payload.get('version')!r}; this diffstat reads {_FILE_VERSION}"
        )
    try:
        cls = _MODEL_CLASSES[payload["model_class"]]
        process = None if payload["process"] is None else process_from_dict(payload["process"])
        kwargs = dict(payload["model_kwargs"])
        if cls is EnergyMLP:
            kwargs.pop("parameterization", None)
        model = cls(**kwargs, process=process if payload["model_uses_process"] else None)
        model = model.to(getattr(torch, payload["dtype"]))
        model.load_state_dict(payload["state_dict"], strict=True)
        config = None if payload["config"] is None else TrainConfig(**payload["config"])
    except (KeyError, TypeError, RuntimeError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{path} does not describe a consistent model "
            f"(mismatched architecture, weights or settings): {exc}"
        ) from exc
    model.eval()
    return model, process, config
