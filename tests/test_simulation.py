"""End-to-end: a 2-round, 3-client simulation through flwr.simulation.run_simulation on Ray (issue 2)."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from fedaqt.config import RunConfig
from fedaqt.launch.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory):
    """The default corpus when setup built it, else a tiny one built here (needs flite/espeak-ng)."""
    default = ROOT / "data" / "speech"
    if (default / "corpus.json").exists() and json.loads((default / "corpus.json").read_text()).get("complete"):
        return default
    from fedaqt.data.corpus import build_speech_corpus

    out = tmp_path_factory.mktemp("speech")
    build_speech_corpus(out, num_train_speakers=4, num_eval_speakers=1, utterances_per_speaker=4,
                        eval_utterances_per_speaker=2, progress=False)
    return out


@pytest.mark.slow
def test_two_round_three_client_ray_simulation(tmp_path, speech_dir):
    out = tmp_path / "run"
    cfg = RunConfig(
        num_clients=3, clients_per_round=3, rounds=2, batch_size=2, bits=4, eval_every=1, out=str(out),
        options={"eval_max": 4, "data_dir": str(speech_dir), "real_eval": False},
    )
    summary = run_experiment(cfg)
    rounds = pd.read_csv(out / "rounds.csv")
    clients = pd.read_csv(out / "clients.csv")
    assert list(rounds["round"]) == [1, 2]
    assert summary["rounds_completed"] == 2
    assert (rounds["clients_ok"] == 3).all()
    assert len(clients) == 6 and (clients["status"] == "ok").all()
    assert sorted(clients[clients["round"] == 1]["client_id"]) == [0, 1, 2]
    assert rounds["eval_cer"].notna().all() and rounds["bytes_down"].gt(0).all()
    # Ray ran the clients in worker processes, not in this one
    assert os.getpid() not in set(clients["pid"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["bits"] == 4 and saved["rounds"] == 2
    assert (out / "summary.json").exists()
    import ray

    assert not ray.is_initialized()
