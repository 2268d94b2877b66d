import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEECH = ROOT / "data" / "speech"


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """fedaqt's on-disk caches (the corpus scan's audio checks) go to a folder of this test session, not the
    user's ~/.cache (subprocesses and Ray actors inherit the variable)."""
    old = os.environ.get("FEDAQT_CACHE_DIR")
    os.environ["FEDAQT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedaqt-cache"))
    yield
    if old is None:
        os.environ.pop("FEDAQT_CACHE_DIR", None)
    else:
        os.environ["FEDAQT_CACHE_DIR"] = old


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


# ---------------------------------------------------------------------------------------------- example plugin
@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """The example plugin installed (pip, offline, no deps) into a fresh site directory of its own."""
    work = tmp_path_factory.mktemp("example-plugin")
    src = work / "src"
    shutil.copytree(ROOT / "examples" / "fedaqt-example-plugin", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    assert list(site.glob("fedaqt_example_plugin-*.dist-info"))
    return site


@pytest.fixture
def with_example(example_site, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(example_site))
    yield example_site
    for mod in [m for m in sys.modules if m.startswith("fedaqt_example_plugin")]:
        del sys.modules[mod]
