"""Issue 9 item 2: ``peak_mib`` is the whole client round's peak (received broadcast while held, decoding,
training, the serialized reply), checked against an independent measure: the process RSS of a real round
(``handle_train``) of a 64 MiB float32 model, in a fresh process whose allocator returns large blocks to the OS
(``MALLOC_MMAP_THRESHOLD_``). RSS estimate of the peak = ``VmHWM`` (over the round) - ``VmRSS`` (before it,
broadcast already received, client model not yet built) + the received bytes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODEL_MIB = 16 * (1024 * 1024 + 1024) * 4 / 2**20  # BigWorkload's float32 encoder weights + biases

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM)")


def run_round(mode, bits):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(TESTS / "_rss_round.py"), mode, str(bits)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["rss_peak_mib"] = (r["hwm"] - r["rss0"] + r["received"]) / 2**20
    return r


@pytest.mark.parametrize("mode, bits", [("release", 32), ("keep", 32), ("keep", 8)])
def test_tracked_peak_matches_rss_of_the_whole_round(mode, bits):
    r = run_round(mode, bits)
    # within 4% (the issue asks 10%; measured ~1-2%): the training-only peak misses it by 5-7% here
    assert r["peak_mib"] == pytest.approx(r["rss_peak_mib"], rel=0.04), r
    assert r["peak_mib"] > r["train_peak_mib"]
    if mode == "release" and bits == 32:
        # decoded in place, broadcast freed, reply serialized without a second copy: about model + upload
        # (old code: model + broadcast + decoded copy, or model + broadcast + upload + its bytes: ~4x the model)
        assert r["rss_peak_mib"] < 2.3 * MODEL_MIB, r
    if mode == "keep":  # the received bytes stay (in-process caller): they are part of the peak
        assert r["wire_mib"] >= r["received"] / 2**20
