"""Phone-menu text domain and the phone corpus (issue 11): clause split, transcripts, groups, telephone band."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedaqt.data.corpus import available_engines, build_speech_corpus
from fedaqt.data.speech import CHARSET, scan_librispeech

phone_text = pytest.importorskip("fedaqt.data.phone_text")


def _bank_or_skip():
    try:
        return phone_text.clause_bank()
    except FileNotFoundError:
        pytest.skip("asterisk-core-sounds-en not installed")


def test_phone_text_splits_and_transcripts():
    bank = _bank_or_skip()
    tr, dev = phone_text.PhoneTextGenerator("train", 0), phone_text.PhoneTextGenerator("dev", 0)
    assert set(tr.clauses).isdisjoint(dev.clauses) and set(tr.clauses) | set(dev.clauses) == set(bank)
    assert 0.03 < len(dev.clauses) / len(bank) < 0.2
    rng_a, rng_b = random.Random(5), random.Random(5)
    a = [tr.sample(rng_a) for _ in range(400)]
    assert a == [tr.sample(rng_b) for _ in range(400)]  # deterministic for a seed
    assert {k for k, _ in a} == set(phone_text.KINDS)
    for _, t in a:
        assert set(t) <= set(CHARSET) and 2 <= len(t.split()) <= 14 and t == t.strip()
    with pytest.raises(ValueError, match="split='test'"):
        phone_text.PhoneTextGenerator("test")
    with pytest.raises(ValueError, match="mix="):
        phone_text.PhoneTextGenerator("train", mix={"poems": 1.0})


def _high_band_fraction(path: Path) -> float:
    x, sr = sf.read(str(path), dtype="float64")
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    return float(spec[freqs > 5000].sum() / spec.sum())


def test_phone_corpus_groups_channels_and_held_out_text(tmp_path: Path):
    if available_engines() != ["flite", "espeak"]:
        pytest.skip("flite and espeak-ng are both needed")
    _bank_or_skip()
    out = tmp_path / "phone"
    build_speech_corpus(out, num_train_speakers=2, num_eval_speakers=1, utterances_per_speaker=2,
                        eval_utterances_per_speaker=2, progress=False, workers=1, domain="phone",
                        num_pretrain_speakers=3, pretrain_utterances_per_speaker=2)
    rows = list(csv.DictReader(open(out / "speakers.csv")))
    assert [(r["speaker_id"], r["group"], r["channel_hz"]) for r in rows] == [
        ("1001", "pretrain", "16000"), ("1002", "pretrain", "16000"), ("1003", "pretrain", "16000"),
        ("3001", "client", "8000"), ("3002", "client", "8000"), ("5001", "dev", "8000")]
    train, dev = scan_librispeech(out, "train"), scan_librispeech(out, "dev")
    assert sorted(train)[:3] == ["1001", "1002", "1003"]  # pretraining speakers first (speaker_offset = 3)
    train_texts = {u.transcript for v in train.values() for u in v}
    assert train_texts.isdisjoint(u.transcript for v in dev.values() for u in v)
    # telephone band: (almost) no energy above 5 kHz for client/dev speakers; wideband pretraining speech has it
    tel = [_high_band_fraction(u.path) for s in ("3001", "3002") for u in train[s]] + \
          [_high_band_fraction(u.path) for v in dev.values() for u in v]
    wide = [_high_band_fraction(u.path) for s in ("1001", "1002", "1003") for u in train[s]]
    assert max(tel) < 1e-5 and 100 * max(tel) < np.median(wide), (tel, wide)
    with pytest.raises(ValueError, match="domain='poetry'"):
        build_speech_corpus(tmp_path / "x", 1, 1, 1, 1, progress=False, domain="poetry")
    with pytest.raises(ValueError, match="num_pretrain_speakers=2"):
        build_speech_corpus(tmp_path / "y", 1, 1, 1, 1, progress=False, domain="shakespeare", num_pretrain_speakers=2)


def test_cli_pretrain_defaults_are_the_recipe_defaults():
    from fedaqt.cli import _PRETRAIN
    from fedaqt.workloads.asr_pretrain import PretrainRecipe

    r = PretrainRecipe()
    assert (_PRETRAIN.speakers, _PRETRAIN.steps, _PRETRAIN.batch_size, _PRETRAIN.lr) == (r.speakers, r.steps, r.batch_size, r.lr)


def test_run_ignores_a_damaged_pretrained_recipe(tmp_path, monkeypatch):
    import json

    from fedaqt import cli
    from fedaqt.config import RunConfig

    d = tmp_path / "runs" / "pretrained"
    d.mkdir(parents=True)
    (d / "pretrained.pt").write_bytes(b"x")
    (d / "pretrained.json").write_text(json.dumps({"recipe": {"speakers": 4, "not_a_field": 1}, "key": "k"}))
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig()
    assert cli._with_pretrained(cfg) is cfg  # unchanged: random init, with a message


def test_text_shift_gives_pretraining_and_client_speakers_disjoint_kinds(tmp_path: Path):
    """--text-shift: pretraining speakers never read the callers' words (NATO spelling, weekdays, months),
    client/dev speakers mostly do; without it every group draws from one mix (checked on the candidate lines,
    no synthesis)."""
    bank_words = {w for c in _bank_or_skip() for w in c.split()}
    from fedaqt.data.corpus import _phone_jobs, plan_phone_speakers

    specs = plan_phone_speakers(4, 4, 2, 0, ["flite", "espeak"])
    # words only the callers' kinds produce (ECHO, MAY, ... also occur in prompt clauses)
    callers = {w.upper() for w in phone_text.NATO + phone_text.WEEKDAYS + phone_text.MONTHS} - bank_words

    def share(jobs, group):  # fraction of a group's candidate lines with a callers' word
        lines = [t for j in jobs if j["spec"]["group"] == group for t, _ in j["candidates"]]
        return sum(bool(set(t.split()) & callers) for t in lines) / len(lines)

    shifted = _phone_jobs(specs, 20, 20, 10, 0, tmp_path, text_shift=True)
    assert share(shifted, "pretrain") == 0.0
    assert share(shifted, "client") > 0.25 and share(shifted, "dev") > 0.25
    plain = _phone_jobs(specs, 20, 20, 10, 0, tmp_path)
    assert 0.0 < share(plain, "pretrain") < 0.2 and share(plain, "client") < 0.2
