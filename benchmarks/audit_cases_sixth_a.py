"""Audit cases of the sixth round, set A (``docs/audit.md``): each entry maps a name to a function
returning ``(target, exact)`` as in ``audit_cases.py``."""

from __future__ import annotations

SIXTH_A: dict = {}
