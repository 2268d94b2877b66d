"""Reader for speech corpora in the LibriSpeech directory layout.

Layout (Panayotov et al., "LibriSpeech: an ASR corpus based on public domain audio books", ICASSP 2015)::

    ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac
    ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt      # lines "UTTID TEXT"

The same layout is written by :func:`fedaqt.data.corpus.build_speech_corpus` (``fedaqt data speech --out DIR``),
so a real LibriSpeech download and the default synthesized corpus go through the same reader.

Audio is read with ``soundfile`` (``torchaudio.load`` needs torchcodec, which is not usable here) and resampled
with ``torchaudio.functional.resample``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

__all__ = [
    "CHARSET",
    "AUDIO_SUFFIXES",
    "Utterance",
    "scan_librispeech",
    "load_audio",
    "AudioDecodeError",
    "normalize_transcript",
]

logger = logging.getLogger("fedaqt.data")

#: CTC character vocabulary (the blank symbol is NOT included): space, apostrophe, then A–Z (28 symbols).
#: A model with a blank at index 0 maps ``CHARSET[i]`` to label ``i + 1``.
CHARSET: str = " '" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: Audio file suffixes recognised next to a ``.trans.txt`` file (LibriSpeech itself uses ``.flac``).
AUDIO_SUFFIXES: tuple[str, ...] = (".flac", ".wav")


@dataclass(frozen=True)
class Utterance:
    """One transcribed utterance of a LibriSpeech-layout corpus.

    Attributes:
        utt_id: ``SPEAKER-CHAPTER-UTT`` (e.g. ``"1272-128104-0000"``).
        speaker_id: speaker folder name (a decimal string in LibriSpeech).
        chapter_id: chapter folder name.
        path: absolute path of the audio file (FLAC, or WAV).
        transcript: transcript normalized by :func:`normalize_transcript` (only ``CHARSET`` characters).
    """

    utt_id: str
    speaker_id: str
    chapter_id: str
    path: Path
    transcript: str


# --------------------------------------------------------------------------------------------------------------
# transcripts

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_NOT_ALLOWED = re.compile(r"[^A-Z' ]+")
_EDGE_APOSTROPHE = re.compile(r"(?<![A-Z])'|'(?![A-Z])")
_SPACES = re.compile(r" +")


def normalize_transcript(text: str) -> str:
    """Normalize text to the LibriSpeech transcript convention.

    Upper-cases, folds accents (``é`` → ``E``), maps typographic apostrophes to ``'``, turns every other character
    (punctuation, hyphens, digits, symbols) into a word break, keeps an apostrophe only *inside* a word
    (``don't`` → ``DON'T``, ``'tis`` → ``TIS``, quotes ``'so'`` → ``SO``) and collapses whitespace to single spaces.
    ``&`` becomes ``AND``. Digits are *dropped* (spell numbers out first if they are spoken).

    Args:
        text: any Unicode string.

    Returns:
        A string over :data:`CHARSET` with no leading/trailing or double spaces (possibly empty).
    """
    text = str(text)
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.translate(_APOSTROPHES).replace("&", " and ").upper()
    text = _NOT_ALLOWED.sub(" ", text)
    text = _EDGE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------------------------
# audio


class AudioDecodeError(RuntimeError):
    """libsndfile could not decode an audio file; the message names the file (the cause is chained)."""


def load_audio(path: str | Path, target_sr: int = 16000) -> torch.Tensor:
    """Read an audio file as a mono float waveform at ``target_sr``.

    Args:
        path: any format libsndfile reads (FLAC, WAV, OGG …).
        target_sr: output sample rate in Hz (positive int). Audio at another rate is resampled with
            ``torchaudio.functional.resample`` (windowed sinc); the output has ``ceil(T_in * target_sr / sr)``
            samples.

    Returns:
        ``torch.float32`` tensor of shape ``[T]`` (samples), values clamped to ``[-1, 1]``. Multi-channel audio is
        averaged to mono.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``target_sr`` is not a positive int, or the file holds no samples.
        AudioDecodeError (a ``RuntimeError``): libsndfile cannot decode the file; the message names it.
    """
    if isinstance(target_sr, bool) or not isinstance(target_sr, (int, np.integer)) or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive int (Hz), got {target_sr!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioDecodeError(f"cannot decode audio file {path}: {exc}") from exc
    if data.shape[0] == 0:
        raise ValueError(f"audio file holds no samples: {path}")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    if sr != target_sr:
        wav = torchaudio.functional.resample(wav, int(sr), int(target_sr))
    return wav.clamp_(-1.0, 1.0).contiguous()


# --------------------------------------------------------------------------------------------------------------
# directory scan


def _natural_key(name: str) -> tuple:
    """Sort numeric names numerically (LibriSpeech ids), then any others by string."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _utt_key(utt_id: str) -> tuple:
    return tuple(_natural_key(part) for part in utt_id.split("-"))


def _readable_audio(path: Path) -> str | None:
    """Return None when ``path`` is decodable audio with at least one frame, else the reason it is unusable.

    Reads the header and then decodes the last frame (a seek to the end), which fails for a truncated file
    (e.g. a FLAC whose header announces more frames than the file holds); this costs about as much as the header.
    A file damaged in the middle still passes; :func:`load_audio` then names it in its error.
    """
    try:
        f = sf.SoundFile(str(path))
    except Exception as exc:  # libsndfile raises for empty/corrupt files
        return f"unreadable audio ({type(exc).__name__})"
    with f:
        if f.frames <= 0:
            return "empty audio"
        try:
            f.seek(f.frames - 1)
            if len(f.read(1)) != 1:
                return "undecodable audio (last frame missing: truncated file)"
        except Exception as exc:  # noqa: BLE001 - libsndfile fails to seek/decode a truncated file
            return f"undecodable audio ({type(exc).__name__}: truncated file?)"
    return None


#: environment variable naming the folder of fedaqt's on-disk caches (default ``$XDG_CACHE_HOME/fedaqt``, else
#: ``~/.cache/fedaqt``); ``FEDAQT_CACHE_DIR=off`` disables them
CACHE_ENV = "FEDAQT_CACHE_DIR"
_CHECK_CACHE_VERSION = 1


def cache_dir() -> Path | None:
    """Folder of fedaqt's on-disk caches (see :data:`CACHE_ENV`); None when disabled."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "fedaqt"


class _AudioChecks:
    """:func:`_readable_audio` results of one subset folder, kept on disk between processes.

    Why our own: checking every file (header + last frame) is most of a corpus scan (the default corpus's train subset:
    0.94 s, 0.11 s from this cache), and a run repeats the scan in the driver and in every client process. An entry is reused only while
    the file's ``(size, mtime_ns)`` is unchanged, so a rewritten or truncated file is checked again. The cache is
    an optimization only: an unreadable or foreign cache file is ignored, and a failed write is logged at debug
    level; writes go through a temporary file and ``os.replace`` (concurrent client processes never see a partial
    file)."""

    def __init__(self, subset_dir: Path) -> None:
        self.subset_dir = subset_dir
        self.entries: dict[str, list] = {}
        self.changed = False
        folder = cache_dir()
        self.path = None
        if folder is None:
            return
        digest = hashlib.sha1(str(subset_dir).encode()).hexdigest()[:16]
        self.path = folder / f"audio-checks-{digest}.json"
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == _CHECK_CACHE_VERSION and data.get("subset") == str(subset_dir):
                # an entry is [size, mtime_ns, reason or None]; anything else is dropped (checked again)
                self.entries = {
                    k: v for k, v in data["entries"].items()
                    if isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v[:2])
                    and (v[2] is None or isinstance(v[2], str))
                }
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            self.entries = {}

    def reason(self, path: Path) -> str | None:
        """:func:`_readable_audio` of ``path``, from the cache when the file is unchanged."""
        try:
            st = path.stat()
        except OSError:
            return _readable_audio(path)
        key = path.relative_to(self.subset_dir).as_posix()  # the scan only passes files under subset_dir
        hit = self.entries.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        out = _readable_audio(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, out]
        self.changed = True
        return out

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"version": _CHECK_CACHE_VERSION, "subset": str(self.subset_dir), "entries": self.entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".audio-checks-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.debug("audio-check cache not written to %s (%s)", self.path, exc)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _missing_message(what: Path, root: Path) -> str:
    hint = ""
    if root.is_dir():
        subsets = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = f" Subsets present under {root}: {subsets or 'none'}."
    return (
        f"LibriSpeech-layout speech data not found: looked for directory {what} "
        f"(layout ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac + SPEAKER-CHAPTER.trans.txt).{hint} "
        f"Build the default synthesized corpus with `fedaqt data speech --out DIR` (then root=DIR, subset "
        f"'train' or 'dev'), or point root at a real LibriSpeech download (e.g. root=.../LibriSpeech, "
        f"subset='train-clean-100')."
    )


def _read_transcripts(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            utt_id, _, text = line.partition(" ")
            out[utt_id] = text
    return out


def scan_librispeech(root: str | Path, subset: str) -> dict[str, list[Utterance]]:
    """List the usable utterances of one subset of a LibriSpeech-layout corpus.

    Reads transcripts, audio headers and the last frame of each file (not the whole audio). An utterance is usable when it has a
    transcript line whose normalized text is non-empty and an audio file (``.flac`` or ``.wav``) whose header
    libsndfile reads with at least one frame and whose last frame decodes (a truncated file is skipped, and
    logged with its path). Unusable utterances are skipped; a speaker left with no usable
    utterance is skipped. Each skip is logged as a warning on the ``"fedaqt.data"`` logger naming the speaker
    (one line per speaker, with counts by reason); nothing raises for bad content. Each file's check is cached on
    disk by ``(size, mtime_ns)`` (:class:`_AudioChecks`, folder :func:`cache_dir`; ``FEDAQT_CACHE_DIR=off``
    disables it), so repeated scans of an unchanged corpus read only the folder listing and the transcripts.

    Args:
        root: corpus root (the folder holding the subset folders, e.g. ``.../LibriSpeech``).
        subset: subset folder name (``"train-clean-100"``, ``"dev-clean"``, or ``"train"``/``"dev"`` for the
            corpus built by ``fedaqt data speech``).

    Returns:
        ``{speaker_id: [Utterance, ...]}`` with speakers in natural order (numeric ids numerically) and each
        speaker's utterances sorted by (chapter, utterance number). Transcripts are normalized with
        :func:`normalize_transcript`. Paths are absolute.

    Raises:
        FileNotFoundError: ``root/subset`` is not a directory; the message says what was looked for and how to
            build the default corpus or use a real LibriSpeech download.
    """
    root = Path(root).expanduser()
    subset_dir = root / str(subset)
    if not subset_dir.is_dir():
        raise FileNotFoundError(_missing_message(subset_dir, root))
    subset_dir = subset_dir.resolve()

    result: dict[str, list[Utterance]] = {}
    checks = _AudioChecks(subset_dir)
    speaker_dirs = sorted(
        (p for p in subset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural_key(p.name)
    )
    for spk_dir in speaker_dirs:
        speaker = spk_dir.name
        utts: list[Utterance] = []
        skipped: dict[str, int] = {}

        def skip(reason: str, n: int = 1) -> None:
            skipped[reason] = skipped.get(reason, 0) + n

        chapter_dirs = sorted(
            (p for p in spk_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural_key(p.name)
        )
        for ch_dir in chapter_dirs:
            chapter = ch_dir.name
            audio: dict[str, Path] = {}
            for f in ch_dir.iterdir():
                if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES and not f.name.startswith("."):
                    # .flac wins over .wav when both exist
                    if f.stem not in audio or f.suffix.lower() == ".flac":
                        audio[f.stem] = f
            trans_path = ch_dir / f"{speaker}-{chapter}.trans.txt"
            texts = _read_transcripts(trans_path) if trans_path.is_file() else {}
            for utt_id in sorted(set(audio) | set(texts), key=_utt_key):
                if utt_id not in texts:
                    skip("no transcript line")
                    continue
                if utt_id not in audio:
                    skip("missing audio file")
                    continue
                transcript = normalize_transcript(texts[utt_id])
                if not transcript:
                    skip("empty transcript")
                    continue
                reason = checks.reason(audio[utt_id])
                if reason is not None:
                    logger.warning("skipping %s: %s", audio[utt_id], reason)
                    skip(reason)
                    continue
                utts.append(Utterance(utt_id, speaker, chapter, audio[utt_id], transcript))
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
        if not utts:
            logger.warning(
                "speaker %s in %s has no usable utterances (%s); speaker skipped",
                speaker, subset_dir, reasons or "no chapters/audio",
            )
            continue
        if skipped:
            logger.warning("speaker %s in %s: skipped %d utterance(s): %s", speaker, subset_dir, sum(skipped.values()), reasons)
        result[speaker] = utts
    checks.save()
    return result
