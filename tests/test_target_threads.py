"""Targets evaluated by several threads at once leave ``torch.distributions``' default validation as
the user had it (``diffstat._validation``).

Regression: ``test_a_run_meets_invalid_distribution_arguments_as_rejected_points_not_errors``
(in ``tests/test_target.py``) failed after ``tests/dnc/test_pipeline.py`` (shards sampled by a
thread pool): each evaluation saved the process-wide flag, switched it off and restored it, so a
thread entering while another was inside saved "off" and, leaving last, restored it (17 of 20
two-thread runs of 200 evaluations each left validation off). Here the interleaving is forced
with events, so the test is exact."""

import threading

import pytest
import torch

import diffstat as ds

D = torch.distributions.Distribution
WAIT = 60.0  # seconds an event may take before the test gives up (a hang, not a timing)


def _normal(x):
    return torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)


@pytest.mark.parametrize("user_setting", [True, False])
def test_overlapping_evaluations_restore_the_users_setting(user_setting):
    """A enters, B enters, A leaves, B leaves: the interleaving that left the flag off."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first(x):  # thread A: inside until B is inside too
        a_in.set()
        assert b_in.wait(WAIT)
        seen["a"] = D._validate_args
        return _normal(x)

    def second(x):  # thread B: entered while A was inside, leaves after A
        b_in.set()
        assert a_out.wait(WAIT)
        seen["b"] = D._validate_args
        return _normal(x)

    target_a = ds.Target(first, 2, dtype=torch.float64, validate=False)
    target_b = ds.Target(second, 2, dtype=torch.float64, validate=False)
    x = torch.zeros(3, 2, dtype=torch.float64)
    errors = []

    def run(target, done=None):
        try:
            target.log_prob(x)
        except BaseException as err:  # noqa: BLE001  (reported below, from the main thread)
            errors.append(err)
        finally:
            if done is not None:
                done.set()

    previous = D._validate_args
    D.set_default_validate_args(user_setting)
    try:
        thread_a = threading.Thread(target=run, args=(target_a, a_out))
        thread_a.start()
        assert a_in.wait(WAIT)
        thread_b = threading.Thread(target=run, args=(target_b,))
        thread_b.start()
        thread_a.join(WAIT)
        thread_b.join(WAIT)
        after = D._validate_args
    finally:
        D.set_default_validate_args(previous)
    assert not errors and seen == {"a": False, "b": False}  # off inside either evaluation
    assert after is user_setting
