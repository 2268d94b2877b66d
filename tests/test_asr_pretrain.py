"""Central pretraining (issue 11, must-show 4): deterministic for a seed, cached, loads into the federated run,
and a tiny federated run from the checkpoint lowers its loss."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedaqt.config import RunConfig
from fedaqt.workloads.asr import ASRWorkload
from fedaqt.workloads.asr_pretrain import CHECKPOINT_NAME, PretrainRecipe, pretrain

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    default = ROOT / "data" / "speech"
    if (default / "corpus.json").exists() and json.loads((default / "corpus.json").read_text()).get("complete"):
        return default
    from fedaqt.data.corpus import build_speech_corpus

    out = tmp_path_factory.mktemp("speech")
    build_speech_corpus(out, num_train_speakers=4, num_eval_speakers=1, utterances_per_speaker=4,
                        eval_utterances_per_speaker=2, progress=False)
    return out


def _recipe(speech_dir, seed=0, steps=3):
    return PretrainRecipe(data_dir=str(speech_dir), speakers=2, steps=steps, batch_size=2, seed=seed)


def test_pretraining_is_deterministic_for_a_seed_and_cached(tmp_path, speech_dir):
    a = pretrain(_recipe(speech_dir), tmp_path / "a", evaluate=False)
    b = pretrain(_recipe(speech_dir), tmp_path / "b", evaluate=False)
    c = pretrain(_recipe(speech_dir, seed=1), tmp_path / "c", evaluate=False)
    sa, sb, sc = (torch.load(p / CHECKPOINT_NAME, weights_only=True) for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["curve"] == b["curve"] and len(a["curve"]) == 3
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    # the same recipe again is a cache hit; another step count is not
    assert pretrain(_recipe(speech_dir), tmp_path / "a", evaluate=False)["reused"] is True
    assert pretrain(_recipe(speech_dir, steps=2), tmp_path / "a", evaluate=False)["reused"] is False


def test_bad_speakers_rejected_before_training(tmp_path, speech_dir):
    with pytest.raises(ValueError, match="speakers=999"):
        pretrain(PretrainRecipe(data_dir=str(speech_dir), speakers=999, steps=1), tmp_path)


@pytest.mark.slow
def test_checkpoint_loads_into_federated_run_and_lowers_its_loss(tmp_path, speech_dir):
    from fedaqt.launch.runner import run_experiment

    meta = pretrain(_recipe(speech_dir, steps=20), tmp_path / "pre", evaluate=False)
    opts = {"eval_max": 4, "data_dir": str(speech_dir), "real_eval": False, "init_checkpoint": meta["checkpoint"],
            "speaker_offset": 2, "dropout": 0.0}
    # loads: the federated workload's initial model equals the checkpoint (an independent torch.load)
    cfg = RunConfig(num_clients=2, clients_per_round=2, rounds=4, batch_size=4, bits=32, eval_every=1,
                    strategy="fedavg", algorithm="fedavg", local_steps=2, lr=0.01, server_lr=1.0, server_momentum=0.0,
                    out=str(tmp_path / "run"), options=opts)
    model = ASRWorkload(cfg).build_model()
    saved = torch.load(meta["checkpoint"], weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # the pretrained model's held-out loss, computed here, is what FL starts from
    w = ASRWorkload(cfg)
    w.prepare()
    before = w.evaluate(model, 0)["eval_loss"]
    run_experiment(cfg)
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert rounds["eval_loss"].iloc[-1] < before


def test_run_from_the_checkpoint_gets_the_finetuning_recipe_where_nothing_was_chosen(tmp_path, speech_dir, monkeypatch):
    """`fedaqt run` from the pretrained checkpoint: server Adam (tau 1e-8, beta_2 0.999) at 1e-3 with a cosine
    decay, 200 rounds, no dropout -- each only where the preset, file and command line left the key unset."""
    from fedaqt import cli
    from fedaqt.config import explicit_keys, resolve_config

    monkeypatch.chdir(tmp_path)
    pretrain(_recipe(speech_dir), "runs/pretrained", evaluate=False)
    base = {"options": {"data_dir": str(speech_dir)}}
    cfg = cli._with_pretrained(resolve_config(None, None, base), explicit_keys(None, None, base))
    assert (cfg.strategy, cfg.server_lr, cfg.rounds) == ("fedadam", 1e-3, 200)
    o = cfg.options
    assert (o["tau"], o["beta_2"], o["server_lr_schedule"], o["dropout"], o["speaker_offset"]) == (1e-8, 0.999, "cosine", 0.0, 2)
    assert o["init_checkpoint"] == "runs/pretrained/pretrained.pt"
    # a chosen strategy keeps its own learning rate and options; chosen rounds and dropout stay as chosen
    toml = tmp_path / "my.toml"
    toml.write_text('strategy = "fedsgd"\nrounds = 7\n[options]\ndropout = 0.2\n')
    cli_values = {"num_clients": 3, "rounds": None, "options": {"data_dir": str(speech_dir)}}
    cfg = cli._with_pretrained(resolve_config(None, str(toml), cli_values), explicit_keys(None, str(toml), cli_values))
    assert (cfg.strategy, cfg.server_lr, cfg.rounds, cfg.options["dropout"]) == ("fedsgd", 0.05, 7, 0.2)
    assert not {"tau", "beta_2", "server_lr_schedule"} & set(cfg.options)
    assert cfg.options["init_checkpoint"] == "runs/pretrained/pretrained.pt"
