"""Speech data: LibriSpeech-layout reader, synthesized corpus builder, Asterisk real-speech eval set."""

from __future__ import annotations

import csv
import json
import logging
import os
import string
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedaqt.data import corpus as corpus_mod
from fedaqt.data.asterisk import asterisk_available, asterisk_transcript, load_asterisk_eval
from fedaqt.data.corpus import available_engines, build_speech_corpus
from fedaqt.data.speech import CHARSET, Utterance, load_audio, normalize_transcript, scan_librispeech

SR = 16000


def _sine(seconds: float, sr: int = SR, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_chapter(root: Path, spk: str, ch: str, utts: dict[str, str | None], audio: dict[str, str]) -> None:
    """utts: utt number -> transcript (None = no line); audio: utt number -> "ok" | "empty" | "missing"."""
    d = root / spk / ch
    d.mkdir(parents=True)
    lines = [f"{spk}-{ch}-{u} {t}" for u, t in utts.items() if t is not None]
    (d / f"{spk}-{ch}.trans.txt").write_text("".join(l + "\n" for l in lines))
    for u, kind in audio.items():
        p = d / f"{spk}-{ch}-{u}.flac"
        if kind == "ok":
            sf.write(p, _sine(0.25 + 0.05 * int(u)), SR, format="FLAC")
        elif kind == "empty":
            p.write_bytes(b"")


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    sub = tmp_path / "train-clean-100"
    # numeric ids: natural order 19 < 103 < 1001 (string order would differ)
    _write_chapter(sub, "1001", "5", {"0000": "the end"}, {"0000": "ok"})
    _write_chapter(sub, "103", "1240", {"0000": "CHAPTER ONE", "0001": "ghost line"}, {"0000": "ok", "0001": "missing"})
    _write_chapter(sub, "19", "198", {"0001": "Hello, world!", "0000": "NORTHANGER ABBEY"}, {"0000": "ok", "0001": "ok"})
    _write_chapter(sub, "200", "7", {}, {"0000": "ok", "0001": "ok"})  # audio but no transcript lines
    _write_chapter(sub, "7", "11", {"0000": "EMPTY AUDIO"}, {"0000": "empty"})  # 0-byte flac
    return tmp_path


def test_scan_librispeech_exact_result_and_skips(tiny_tree: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedaqt.data"):
        got = scan_librispeech(tiny_tree, "train-clean-100")
    sub = (tiny_tree / "train-clean-100").resolve()

    def U(spk, ch, u, text):
        return Utterance(f"{spk}-{ch}-{u}", spk, ch, sub / spk / ch / f"{spk}-{ch}-{u}.flac", text)

    assert got == {
        "19": [U("19", "198", "0000", "NORTHANGER ABBEY"), U("19", "198", "0001", "HELLO WORLD")],
        "103": [U("103", "1240", "0000", "CHAPTER ONE")],
        "1001": [U("1001", "5", "0000", "THE END")],
    }
    assert list(got) == ["19", "103", "1001"]
    msgs = [r.getMessage() for r in caplog.records if r.name == "fedaqt.data" and r.levelno == logging.WARNING]
    assert any("speaker 200 " in m and "no usable utterances" in m and "no transcript line" in m for m in msgs)
    assert any("speaker 7 " in m and "no usable utterances" in m and "unreadable audio" in m for m in msgs)
    assert any("speaker 103 " in m and "missing audio file" in m for m in msgs)


def test_scan_librispeech_missing_subset_explains(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as e:
        scan_librispeech(tmp_path, "dev-clean")
    msg = str(e.value)
    assert str(tmp_path / "dev-clean") in msg and "fedaqt data speech --out" in msg and "LibriSpeech" in msg
    with pytest.raises(FileNotFoundError):
        scan_librispeech(tmp_path / "nope", "train")


def test_load_audio_resamples_and_mixes(tmp_path: Path):
    x8 = _sine(1.0, 8000, 300.0)
    sf.write(tmp_path / "a.wav", x8, 8000)
    y = load_audio(tmp_path / "a.wav", 16000)
    assert y.dtype == torch.float32 and y.shape == (16000,)
    assert float(y.abs().max()) <= 1.0
    # a 300 Hz tone stays a 300 Hz tone: its spectrum peaks at 300 Hz (1 Hz bins for a 1 s signal)
    assert int(torch.fft.rfft(y).abs().argmax()) == 300
    stereo = np.stack([x8, 0.5 * x8], axis=1)
    sf.write(tmp_path / "s.flac", stereo, 8000, format="FLAC")
    m = load_audio(tmp_path / "s.flac", 8000)
    assert m.shape == (8000,)
    np.testing.assert_allclose(m.numpy(), 0.75 * x8, atol=1e-3)
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.flac")
    with pytest.raises(ValueError):
        load_audio(tmp_path / "a.wav", 0)


def test_normalize_transcript_and_charset():
    assert CHARSET == " '" + string.ascii_uppercase
    cases = {
        "Hello, world!": "HELLO WORLD",
        "Don't stop—'tis  o'er the  hill.": "DON'T STOP TIS O'ER THE HILL",
        "Café au lait & 'quoted' text": "CAFE AU LAIT AND QUOTED TEXT",
        "  to-night\tis\nhere ": "TO NIGHT IS HERE",
        "rock\u2019n\u2019roll": "ROCK'N'ROLL",
        "room 101": "ROOM",
        "...": "",
        "NORTHANGER ABBEY": "NORTHANGER ABBEY",
    }
    for text, want in cases.items():
        assert normalize_transcript(text) == want, text
        assert set(want) <= set(CHARSET)


def test_build_speech_corpus_tiny(tmp_path: Path):
    if not available_engines():
        pytest.skip("flite/espeak-ng not installed")
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(num_train_speakers=2, num_eval_speakers=1, utterances_per_speaker=2, eval_utterances_per_speaker=2, seed=0)
    ra = build_speech_corpus(a, workers=2, progress=False, **kw)
    assert ra["cached"] is False
    assert ra["counts"]["train"]["utterances"] == 4 and ra["counts"]["dev"]["utterances"] == 2

    train, dev = scan_librispeech(a, "train"), scan_librispeech(a, "dev")
    assert len(train) == 2 and len(dev) == 1 and not set(train) & set(dev)
    assert all(len(v) == 2 for v in train.values()) and all(len(v) == 2 for v in dev.values())
    for utts in [*train.values(), *dev.values()]:
        for u in utts:
            info = sf.info(str(u.path))
            assert info.samplerate == SR and info.channels == 1 and 0.2 < info.duration <= 5.0
            assert 3 <= len(u.transcript.split()) <= 14 and set(u.transcript) <= set(CHARSET)

    rows = list(csv.DictReader(open(a / "speakers.csv")))
    assert [r["split"] for r in rows] == ["train", "train", "dev"]
    assert {r["speaker_id"] for r in rows} == set(train) | set(dev)
    assert all(int(r["num_utterances"]) == 2 for r in rows)
    train_voices = {(r["engine"], r["voice"]) for r in rows if r["split"] == "train"}
    assert all((r["engine"], r["voice"]) in train_voices for r in rows if r["split"] == "dev")
    assert len({(r["play"], r["role"]) for r in rows}) == 3
    meta = json.loads((a / "corpus.json").read_text())
    assert meta["complete"] and meta["params"]["seed"] == 0

    # second call: no-op (nothing rewritten)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    again = build_speech_corpus(a, workers=2, progress=False, **kw)
    assert again["cached"] is True and again["transcripts_sha1"] == ra["transcripts_sha1"]
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == mtimes

    # deterministic: same seed in another folder, in-process worker -> same files and transcripts
    rb = build_speech_corpus(b, workers=1, progress=False, **kw)
    assert rb["transcripts_sha1"] == ra["transcripts_sha1"]
    tb = scan_librispeech(b, "train")
    assert {s: [(u.utt_id, u.transcript) for u in v] for s, v in tb.items()} == {
        s: [(u.utt_id, u.transcript) for u in v] for s, v in train.items()
    }

    # an interrupted build (no corpus.json) is detected and rebuilt
    (b / "corpus.json").unlink()
    (b / "train" / "junk.txt").write_text("partial")
    rb2 = build_speech_corpus(b, workers=1, progress=False, **kw)
    assert rb2["cached"] is False and rb2["transcripts_sha1"] == ra["transcripts_sha1"]
    assert not (b / "train" / "junk.txt").exists()


def test_build_speech_corpus_refuses_foreign_folder_and_missing_engines(tmp_path: Path, monkeypatch):
    if available_engines():
        (tmp_path / "train").mkdir()
        with pytest.raises(FileExistsError):
            build_speech_corpus(tmp_path, 1, 0, 1, 1, progress=False)
        assert (tmp_path / "train").is_dir()
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install flite espeak-ng"):
        build_speech_corpus(tmp_path / "x", 1, 0, 1, 1, progress=False)
    with pytest.raises(ValueError):
        build_speech_corpus(tmp_path / "x", 0, 0, 1, 1, progress=False)


def test_asterisk_transcripts():
    assert asterisk_transcript("press * to toggle pause, press # to enter") == "PRESS STAR TO TOGGLE PAUSE PRESS POUND TO ENTER"
    assert asterisk_transcript("Press 1 for") == "PRESS ONE FOR"
    assert asterisk_transcript("3D audio enabled") == "THREE D AUDIO ENABLED"
    assert asterisk_transcript("at [@]") == "AT"
    assert asterisk_transcript("(10 seconds of silence)") == ""
    assert asterisk_transcript("dial 500 now") is None
    assert asterisk_transcript("the Asterisk open source PBX.") == "THE ASTERISK OPEN SOURCE P B X"


def test_load_asterisk_eval(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="asterisk-core-sounds-en"):
        load_asterisk_eval(transcripts=tmp_path / "none.txt.gz")
    if not asterisk_available():
        pytest.skip("asterisk-core-sounds-en(-wav) not installed")
    data = load_asterisk_eval()
    assert len(data) == 549  # 568 prompts with audio - 17 without speech - 2 with ambiguous numbers
    ids = [u for u, _, _ in data]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    by_id = {u: (w, t) for u, w, t in data}
    w, t = by_id["digits/7"]
    assert t == "SEVEN" and w.dtype == torch.float32 and w.dim() == 1
    frames = sf.info("/usr/share/asterisk/sounds/en_US_f_Allison/digits/7.wav").frames
    assert w.shape[0] == 2 * frames  # 8 kHz -> 16 kHz
    assert all(t and set(t) <= set(CHARSET) for _, _, t in data)
    assert "silence/1" not in by_id and "beep" not in by_id
    short = load_asterisk_eval(max_utterances=3, max_seconds=1.0)
    assert len(short) == 3 and all(w.shape[0] <= 16000 for _, w, _ in short)


def test_truncated_flac_is_skipped_at_scan_with_its_path_and_load_audio_names_a_damaged_file(tmp_path: Path, caplog):
    """Issue 9 item 12: a truncated .flac has an intact header (sf.info reads it), so it used to pass the scan and
    then fail its client every round with a LibsndfileError that named no file."""
    sub = tmp_path / "train"
    _write_chapter(sub, "5", "1", {"0000": "GOOD ONE", "0001": "CUT SHORT"}, {"0000": "ok", "0001": "ok"})
    cut = sub / "5" / "1" / "5-1-0001.flac"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    assert sf.info(str(cut)).frames > 0  # the header still announces every frame
    with caplog.at_level(logging.WARNING, logger="fedaqt.data"):
        got = scan_librispeech(tmp_path, "train")
    assert [u.utt_id for u in got["5"]] == ["5-1-0000"]
    assert any(str(cut.resolve()) in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)

    from fedaqt.data.speech import AudioDecodeError

    damaged = tmp_path / "damaged.flac"
    raw = bytearray(whole)
    raw[len(raw) // 2] ^= 0xFF  # damaged in the middle: passes the cheap scan check, fails to decode
    damaged.write_bytes(bytes(raw))
    with pytest.raises(AudioDecodeError, match=str(damaged)):
        load_audio(damaged)
    with pytest.raises(RuntimeError):  # still a RuntimeError, as LibsndfileError was
        load_audio(damaged)


def test_scan_audio_checks_cached_on_disk_and_redone_for_changed_files(tiny_tree: Path, tmp_path: Path, monkeypatch):
    """Start-up (issue 16): a repeated scan of an unchanged corpus re-checks no audio file; a file whose size or
    mtime changed is checked again; a corrupt cache file is ignored. Reference: the scan with the cache off."""
    from fedaqt.data import speech

    calls: list[Path] = []
    check = speech._readable_audio
    monkeypatch.setattr(speech, "_readable_audio", lambda p: calls.append(p) or check(p))
    monkeypatch.setenv("FEDAQT_CACHE_DIR", "off")
    reference = scan_librispeech(tiny_tree, "train-clean-100")
    n_files = len(calls)
    assert n_files == 5  # every audio file with a transcript line (103-0001 has no audio, 200 no lines)

    monkeypatch.setenv("FEDAQT_CACHE_DIR", str(tmp_path / "cache"))
    calls.clear()
    assert scan_librispeech(tiny_tree, "train-clean-100") == reference
    assert len(calls) == n_files
    calls.clear()
    assert scan_librispeech(tiny_tree, "train-clean-100") == reference
    assert calls == []  # every check came from the cache

    # truncate one file (same path, new size): checked again, and now skipped
    cut = tiny_tree / "train-clean-100" / "19" / "198" / "19-198-0001.flac"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    calls.clear()
    got = scan_librispeech(tiny_tree, "train-clean-100")
    assert [p.name for p in calls] == [cut.name]
    assert [u.utt_id for u in got["19"]] == ["19-198-0000"]
    # same size, new mtime: checked again
    st = cut.stat()
    os.utime(cut, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    calls.clear()
    scan_librispeech(tiny_tree, "train-clean-100")
    assert [p.name for p in calls] == [cut.name]

    # a cache entry of the wrong shape is dropped and checked again (a tampered reason cannot skip a good file)
    cache_file = next((tmp_path / "cache").glob("audio-checks-*.json"))
    data = json.loads(cache_file.read_text())
    key = next(k for k in data["entries"] if k.endswith("1001-5-0000.flac"))
    data["entries"][key] = [data["entries"][key][0], data["entries"][key][1], 7]
    cache_file.write_text(json.dumps(data))
    calls.clear()
    assert scan_librispeech(tiny_tree, "train-clean-100")["1001"] == reference["1001"]
    assert [p.name for p in calls] == ["1001-5-0000.flac"]

    # a corrupt cache file is ignored (everything checked again, same result as without the cache)
    cut.write_bytes(whole)
    for f in (tmp_path / "cache").glob("audio-checks-*.json"):
        f.write_text("{not json")
    calls.clear()
    assert scan_librispeech(tiny_tree, "train-clean-100") == reference
    assert len(calls) == n_files
