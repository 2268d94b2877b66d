"""Real recorded speech for evaluation: the Asterisk PBX core prompts (Debian packages).

``asterisk-core-sounds-en-wav`` ships the prompts spoken by Allison Smith as 8 kHz mono 16-bit WAV files under
``/usr/share/asterisk/sounds/en_US_f_Allison/`` (top level plus ``digits/``, ``letters/``, ``phonetic/``,
``dictate/``, ``followme/``, ``silence/``); ``asterisk-core-sounds-en`` ships their transcripts as
``/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz`` with lines ``name: text`` where ``name`` is the
path of the WAV relative to the sound root without ``.wav`` (e.g. ``digits/7: seven``). CC-BY-SA-3.0.
See shared DATA.md, "Speech".

Transcripts are turned into what is spoken, then normalized to the LibriSpeech convention:
annotations in ``[...]``, ``(...)`` and ``<...>`` are dropped (``at [@]`` → ``AT``; ``(1 second of silence)``,
``[ascending tones]`` → empty, so those prompts are skipped), ``*`` → ``STAR``, ``#`` → ``POUND``, numbers
0–99 are spelled out (``press 1`` → ``PRESS ONE``, ``3D`` → ``THREE D``), the acronyms PBX, IVR, MGCP, USB and
``A.M.``/``P.M.``/``www.asterisk.org`` are spelled as spoken (``P B X``, ``W W W DOT ASTERISK DOT ORG``) and five typos
of the transcript file are fixed (``exclaimation``, ``umute``, ``un-indentified``, ``represenatives``, ``witheld``). Prompts with a number of three or more digits or a decimal (``dial 500``,
``28.8``, ``H.323``) are skipped, because how they are read out (``five hundred`` / ``five oh oh``) is unknown.
"""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import soundfile as sf
import torch

from fedaqt.data.speech import load_audio, normalize_transcript

__all__ = [
    "DEFAULT_SOUND_ROOT",
    "DEFAULT_TRANSCRIPTS",
    "asterisk_available",
    "asterisk_transcript",
    "load_asterisk_eval",
]

logger = logging.getLogger("fedaqt.data")

DEFAULT_SOUND_ROOT = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
DEFAULT_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
# (pattern, replacement) applied to the raw prompt text, case-insensitively: typos of the transcript file and
# tokens whose spoken form differs from their spelling.
_REWRITES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), r)
    for p, r in (
        (r"\bexclaimation\b", "exclamation"),
        (r"\bumute\b", "unmute"),
        (r"\bun-indentified\b", "unidentified"),
        (r"\brepresenatives\b", "representatives"),
        (r"\bwitheld\b", "withheld"),
        (r"\bwww\.asterisk\.org\b", "w w w dot asterisk dot org"),
        (r"\bA\.M\.", "a m"),
        (r"\bP\.M\.", "p m"),
    )
)
_ACRONYM = re.compile(r"\b(PBX|IVR|MGCP|USB)\b")  # spoken letter by letter
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>")
_DIGIT_LETTER = re.compile(r"(?<=\d)(?=[A-Za-z])|(?<=[A-Za-z])(?=\d)")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _spell(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])


def asterisk_transcript(text: str) -> str | None:
    """Spoken-form, LibriSpeech-normalized transcript of one Asterisk prompt text.

    Args:
        text: the part after ``name:`` of a line of ``core-sounds-en.txt.gz``.

    Returns:
        A string over ``fedaqt.data.speech.CHARSET`` (empty when the prompt has no speech, e.g. a beep or
        silence), or ``None`` when it contains a number whose reading is ambiguous (3+ digits or a decimal).
    """
    text = _ANNOTATION.sub(" ", text).replace("*", " star ").replace("#", " pound ")
    for pattern, repl in _REWRITES:
        text = pattern.sub(repl, text)
    text = _ACRONYM.sub(lambda m: " ".join(m.group(1)), text)
    text = _DIGIT_LETTER.sub(" ", text)

    def number(m: re.Match) -> str:
        tok = m.group(0)
        if not tok.isdigit() or len(tok) > 2:
            raise ValueError(tok)
        return f" {_spell(int(tok))} "

    try:
        text = _NUMBER.sub(number, text)
    except ValueError:
        return None
    return normalize_transcript(text)


def _read_transcripts(path: Path) -> dict[str, str]:
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[str, str] = {}
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            out[name.strip()] = text.strip()
    return out


def asterisk_available(sound_root: str | Path = DEFAULT_SOUND_ROOT, transcripts: str | Path = DEFAULT_TRANSCRIPTS) -> bool:
    """True when both the prompt audio (``asterisk-core-sounds-en-wav``) and transcripts (``asterisk-core-sounds-en``)
    are installed at the given paths."""
    root = Path(sound_root)
    return Path(transcripts).is_file() and root.is_dir() and any(root.glob("*.wav"))


def load_asterisk_eval(
    sound_root: str | Path = DEFAULT_SOUND_ROOT,
    transcripts: str | Path = DEFAULT_TRANSCRIPTS,
    target_sr: int = 16000,
    max_utterances: int | None = None,
    max_seconds: float | None = None,
) -> list[tuple[str, torch.Tensor, str]]:
    """Load the transcribed Asterisk prompts as an ASR evaluation set (one real female US-English speaker).

    Order is deterministic: sorted by prompt name. A prompt is skipped when its WAV is missing or unreadable,
    its spoken transcript is empty (beeps, tones, silence) or ambiguous (see module doc), or — with
    ``max_seconds`` — its audio is longer than ``max_seconds``. ``max_utterances`` then keeps the first ones.
    Resampling runs with one torch intra-op thread (the caller's setting is restored afterwards).
    With the installed Debian packages (568 transcribed prompts with audio) this yields 549 prompts, 23.0 min.

    Args:
        sound_root: folder of the prompt WAVs (``en_US_f_Allison``).
        transcripts: ``core-sounds-en.txt.gz`` (or an uncompressed copy).
        target_sr: output sample rate in Hz; the 8 kHz recordings are resampled
            (``torchaudio.functional.resample``).
        max_utterances: keep at most this many prompts (None: all).
        max_seconds: skip prompts whose recording is longer than this many seconds (None: no limit).

    Returns:
        ``[(utt_id, waveform, transcript), ...]``: ``utt_id`` is the prompt name (e.g. ``"digits/7"``,
        ``"vm-goodbye"``); ``waveform`` is a float32 tensor ``[T]`` in ``[-1, 1]`` at ``target_sr``;
        ``transcript`` is normalized (``fedaqt.data.speech.CHARSET``).

    Raises:
        FileNotFoundError: the transcripts (``apt-get install asterisk-core-sounds-en``) or the audio
            (``apt-get install asterisk-core-sounds-en-wav``) are not installed at the given paths.
        ValueError: bad ``max_utterances``/``max_seconds``/``target_sr``.
    """
    sound_root, transcripts = Path(sound_root), Path(transcripts)
    if not transcripts.is_file():
        raise FileNotFoundError(
            f"Asterisk prompt transcripts not found at {transcripts}: `apt-get install asterisk-core-sounds-en` "
            f"(and asterisk-core-sounds-en-wav for the audio)"
        )
    if not sound_root.is_dir():
        raise FileNotFoundError(
            f"Asterisk prompt audio not found at {sound_root}: `apt-get install asterisk-core-sounds-en-wav`"
        )
    if max_utterances is not None and (not isinstance(max_utterances, int) or max_utterances < 0):
        raise ValueError(f"max_utterances must be None or an int >= 0, got {max_utterances!r}")
    if isinstance(target_sr, bool) or not isinstance(target_sr, int) or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive int (Hz), got {target_sr!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be None or > 0 (seconds), got {max_seconds!r}")

    skipped: dict[str, list[str]] = {}
    out: list[tuple[str, torch.Tensor, str]] = []
    # Hundreds of short resamples: intra-op threads only add overhead, and on a busy machine OpenMP thread
    # barriers make them ~10x slower (measured: 12 s with 2 threads vs 1.5 s with 1 under load), so run them on
    # one thread and restore the caller's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _collect(sorted(_read_transcripts(transcripts).items()), sound_root, target_sr, max_utterances, max_seconds, out, skipped)
    finally:
        torch.set_num_threads(threads)
    for reason, names in skipped.items():
        logger.debug("asterisk eval: skipped %d prompt(s), %s: %s", len(names), reason, ", ".join(names))
    return out


def _collect(items, sound_root: Path, target_sr: int, max_utterances, max_seconds, out: list, skipped: dict) -> None:
    for name, text in items:
        if max_utterances is not None and len(out) >= max_utterances:
            break
        transcript = asterisk_transcript(text)
        if transcript is None:
            skipped.setdefault("ambiguous number", []).append(name)
            continue
        if not transcript:
            skipped.setdefault("no speech in transcript", []).append(name)
            continue
        wav = sound_root / f"{name}.wav"
        if not wav.is_file():
            skipped.setdefault("no audio", []).append(name)
            continue
        try:
            info = sf.info(str(wav))
            if info.frames <= 0:
                raise ValueError("empty")
            if max_seconds is not None and info.frames / info.samplerate > max_seconds:
                skipped.setdefault(f"longer than {max_seconds} s", []).append(name)
                continue
            audio = load_audio(wav, target_sr)
        except (RuntimeError, ValueError) as exc:  # soundfile errors are RuntimeErrors
            skipped.setdefault(f"unreadable audio ({type(exc).__name__})", []).append(name)
            continue
        out.append((name, audio, transcript))
