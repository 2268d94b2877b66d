"""Issue 9 item 14 (client part): a failing client's ``error`` names the innermost frame besides ``Type: message``."""

import re

from fedaqt.client.app import error_text, handle_train
from fakegrid import _break


def _fail_deep():
    raise ValueError("bad value 42")


def test_error_text_names_innermost_frame():
    try:
        _fail_deep()
    except ValueError as exc:
        text = error_text(exc)
    assert re.fullmatch(r"ValueError: bad value 42 \(at test_client_error\.py:\d+ in _fail_deep\)", text), text


def test_error_text_is_short_and_keeps_the_location():
    try:
        raise RuntimeError("x" * 5000)
    except RuntimeError as exc:
        text = error_text(exc)
    assert len(text) <= 400 and text.endswith("in test_error_text_is_short_and_keeps_the_location)")
    assert text.startswith("RuntimeError: xxx")


def test_failed_client_reply_carries_the_frame(toy_registered):
    from fedaqt.config import RunConfig
    from fedaqt.server.app import Server
    from fakegrid import FakeGrid

    cfg = RunConfig(workload="toy", strategy="fedsgd", bits=8, uplink_bits=8, num_clients=3, clients_per_round=3,
                    rounds=1, server_lr=1.0, server_momentum=0.0, seed=0)
    grid = FakeGrid(3, fail_partitions={1})
    import tempfile
    from pathlib import Path

    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        Server(cfg.override({"out": d}), Path(d)).run_rounds(grid)
        clients = pd.read_csv(Path(d) / "clients.csv")
    err = clients[clients.client_id == 1].error.iloc[0]
    assert err.startswith("JSONDecodeError: ") and re.search(r"\(at \w+\.py:\d+ in \w+\)$", err), err


def test_error_text_names_the_callers_frame_not_a_librarys():
    """An exception raised inside an installed library (pydantic validating a plugin's bad value) names the
    innermost frame of our/the plugin's code, where the bad value came from."""
    from pydantic import BaseModel

    class M(BaseModel):
        x: int

    def _plugin_code():
        return M(x="not an int")

    try:
        _plugin_code()
    except Exception as exc:  # noqa: BLE001
        text = error_text(exc)
    assert re.search(r"\(at test_client_error\.py:\d+ in _plugin_code\)$", text), text
