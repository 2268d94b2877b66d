"""Device memory budgets (``--device-profile``) — placeholder until the memory-profiling work lands."""

from __future__ import annotations


def make_budget_fn(config):
    raise NotImplementedError("device profiles are not implemented yet")
