"""``torch.distributions``' default argument validation switched off while a Target is evaluated,
safely when threads evaluate targets at once.

The default is one process-wide flag (``Distribution._validate_args``). Saving it, switching it off
and restoring it around each call is a race under threads (``ds.dnc.sample_shards`` with a thread
pool): a thread that enters while another is inside saves "off" as the user's setting, and if it
leaves last it restores "off", so that validation stays off for the rest of the process. Here a
lock and a count of the evaluations in progress keep the user's setting instead: the first to
enter saves it, the last to leave restores it. A change of the setting made by another thread
while evaluations are in progress is undone when the last one leaves.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["validation_off", "unvalidated"]

_LOCK = threading.Lock()
_state = {"inside": 0, "saved": True}


@contextlib.contextmanager
def validation_off():
    """Within the block, ``torch.distributions.Distribution``'s default validation is off; on leaving
    the last such block (of any thread), the setting found on entering the first is restored."""
    distribution = torch.distributions.Distribution
    with _LOCK:
        if _state["inside"] == 0:
            _state["saved"] = distribution._validate_args
        _state["inside"] += 1
        distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        with _LOCK:
            _state["inside"] -= 1
            if _state["inside"] == 0:
                distribution.set_default_validate_args(_state["saved"])


def unvalidated(log_prob, x: torch.Tensor) -> torch.Tensor:
    """``log_prob(x)`` with ``torch.distributions``' default validation off (:func:`validation_off`)."""
    with validation_off():
        return log_prob(x)
