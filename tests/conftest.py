import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEECH = ROOT / "data" / "speech"


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Messages built outside a running ServerApp need a task identity (Flower sets it inside simulations)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Test tensors are small: intra-op threads only add contention (on a loaded 2-core box ~100x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_registered(monkeypatch):
    """Register the in-process test workloads (tests/toy.py, tests/test_budget.py) by name."""
    import fedaqt.plugins as plugins

    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "toy", "toy:ToyWorkload")
    monkeypatch.setitem(plugins._BUILTIN_WORKLOADS, "wide", "test_budget:WideWorkload")
