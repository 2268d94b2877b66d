"""Phone-menu text domain of the default speech corpus: sentences like the real recorded Asterisk prompts.

The real-speech test set of the ASR workload is the Asterisk PBX prompts (digits, letters, NATO alphabet,
voicemail/conference menus; :mod:`fedaqt.data.asterisk`). This module writes the *text* that the synthesizers
read for training and held-out evaluation in that domain, deterministically from a seed:

* ``prompt``   — a clause of an Asterisk prompt transcript (the prompts split at sentence punctuation; 2–14 words),
* ``menu``     — ``press D to ACTION`` / ``to ACTION press D`` / ``for ACTION press D`` with ACTION from the prompts'
  "to ..." clauses,
* ``entry``    — ``please enter your THING followed by the pound key``, ``extension D D D``, ``the number is ...``,
* ``count``    — ``you have N new messages``, ``you are caller number N``, ``message N``,
* ``time``     — ``the time is H MM A M``, ``WEEKDAY MONTH ORDINAL``,
* ``digits``   — 3–9 spoken digits (``oh`` and ``zero`` both occur),
* ``spelling`` — NATO words and ``LETTER as in NATO``.

Every function returns normalized transcripts (:func:`fedaqt.data.speech.normalize_transcript`: upper case, A–Z,
apostrophe, space). The clause bank is split by a seeded hash into a train part (90 %) and a dev part (10 %) so
the held-out speakers read clauses no training speaker reads. The real Asterisk prompt *texts* therefore occur in
the synthesized training text (as in a closed-domain IVR recognizer); ``real_wer`` measures the real recorded
voice and its 8 kHz telephone channel, not unseen text.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

__all__ = ["KINDS", "DEFAULT_MIX", "PRETRAIN_MIX", "CLIENT_MIX", "clause_bank", "PhoneTextGenerator"]

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "twenty thirty forty fifty".split()
NATO = ("alfa bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
        "romeo sierra tango uniform victor whiskey x-ray yankee zulu").split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
            "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()
THINGS = ("password", "mailbox number", "extension", "account number", "conference number", "pin number",
          "phone number", "agent number", "access code", "room number")
KINDS = ("prompt", "menu", "entry", "count", "time", "digits", "spelling")
#: default share of each kind (sums to 1)
DEFAULT_MIX = {"prompt": 0.30, "menu": 0.20, "entry": 0.12, "count": 0.10, "time": 0.08, "digits": 0.12, "spelling": 0.08}
#: text shift of the default corpus (issue 11): the central pretraining speakers read what a phone system says
#: (prompt clauses, menus, entry and count announcements), the federated clients and the held-out speakers read
#: what its callers key in and spell out (digit strings, NATO spelling, times and dates, entries). Words such as
#: the NATO alphabet, weekdays, months and ordinals occur only on the clients, so federated rounds have
#: something to teach that pretraining did not.
PRETRAIN_MIX = {"prompt": 0.40, "menu": 0.30, "entry": 0.15, "count": 0.15}
CLIENT_MIX = {"digits": 0.25, "spelling": 0.25, "time": 0.25, "entry": 0.10, "count": 0.10, "menu": 0.05}
MIN_WORDS, MAX_WORDS = 2, 14

_SPLIT = re.compile(r"[.!?;]+|\.\.\.")


def _number(n: int) -> str:
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    t, o = divmod(n, 10)
    return TENS[t - 2] + ("" if o == 0 else " " + ONES[o])


@functools.lru_cache(maxsize=2)
def clause_bank() -> tuple[str, ...]:
    """Distinct normalized clauses (2–14 words) of every installed Asterisk prompt transcript, sorted.

    Raises:
        FileNotFoundError: ``asterisk-core-sounds-en`` (the transcripts) is not installed.
    """
    from fedaqt.data.asterisk import DEFAULT_TRANSCRIPTS, _read_transcripts, asterisk_transcript

    if not DEFAULT_TRANSCRIPTS.is_file():
        raise FileNotFoundError(
            f"the phone-menu text domain needs the Asterisk prompt transcripts at {DEFAULT_TRANSCRIPTS}: "
            "`apt-get install asterisk-core-sounds-en` (or build the corpus with --domain shakespeare)"
        )
    out: set[str] = set()
    for _, text in _read_transcripts(DEFAULT_TRANSCRIPTS).items():
        for part in _SPLIT.split(text):
            t = asterisk_transcript(part)
            if t and MIN_WORDS <= len(t.split()) <= MAX_WORDS:
                out.add(t)
    return tuple(sorted(out))


def _is_dev(clause: str, seed: int) -> bool:
    return hashlib.sha256(f"{seed}:{clause}".encode()).digest()[0] < 26  # ~10 % of clauses are dev-only


class PhoneTextGenerator:
    """Seeded sampler of phone-menu transcripts for one split.

    Args:
        split: ``"train"`` (train clauses) or ``"dev"`` (the held-out 10 % of clauses).
        seed: corpus seed (fixes the train/dev clause split).
        mix: ``{kind: weight}`` over :data:`KINDS` (default :data:`DEFAULT_MIX`).

    Raises:
        ValueError: unknown split or kind, or weights that are not positive.
    """

    def __init__(self, split: str, seed: int = 0, mix: dict[str, float] | None = None) -> None:
        from fedaqt.data.speech import normalize_transcript

        if split not in ("train", "dev"):
            raise ValueError(f"split={split!r}: choose 'train' or 'dev'")
        mix = dict(DEFAULT_MIX if mix is None else mix)
        bad = [k for k in mix if k not in KINDS]
        if bad or not mix or any(not w > 0 for w in mix.values()):
            raise ValueError(f"mix={mix!r}: keys must be among {KINDS} with positive weights")
        self._norm = normalize_transcript
        want_dev = split == "dev"
        self.clauses = [c for c in clause_bank() if _is_dev(c, seed) == want_dev]
        to = [c for c in self.clauses if c.startswith("TO ") and 3 <= len(c.split()) <= 9 and " PRESS " not in c]
        self.actions = to or ["TO REPEAT THIS MENU"]
        self.kinds, self.weights = list(mix), list(mix.values())
        self._makers = {"prompt": self._prompt, "menu": self._menu, "entry": self._entry, "count": self._count,
                        "time": self._time, "digits": lambda r: self._digits(r, 3, 9), "spelling": self._spelling}

    def _digits(self, rng: random.Random, lo: int, hi: int) -> str:
        return " ".join(rng.choice(ONES + ["oh"]) if i else rng.choice(ONES[1:]) for i in range(rng.randint(lo, hi)))

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One ``(kind, normalized transcript)`` with 2–14 words."""
        while True:
            kind = rng.choices(self.kinds, self.weights)[0]
            text = self._makers[kind](rng)
            t = self._norm(text)
            if MIN_WORDS <= len(t.split()) <= MAX_WORDS:
                return kind, t

    def _prompt(self, rng):
        return rng.choice(self.clauses)

    def _menu(self, rng):
        d, act = _number(rng.randint(0, 9)), rng.choice(self.actions).lower()
        form = rng.randrange(4)
        if form == 0:
            return f"press {d} {act}"
        if form == 1:
            return f"{act} press {d}"
        if form == 2:
            return f"please press {d} {act}"
        d2, act2 = _number(rng.randint(0, 9)), rng.choice(self.actions).lower()
        return f"press {d} {act} or {d2} {act2}"

    def _entry(self, rng):
        form = rng.randrange(5)
        if form == 0:
            return f"please enter your {rng.choice(THINGS)} followed by the pound key"
        if form == 1:
            return f"extension {self._digits(rng, 3, 5)}"
        if form == 2:
            return f"the number is {self._digits(rng, 4, 7)}"
        if form == 3:
            return f"please enter the {rng.choice(THINGS)} {rng.choice(['now', 'followed by pound', 'and then press star'])}"
        return f"you entered {self._digits(rng, 3, 6)}"

    def _count(self, rng):
        n = _number(rng.randint(1, 59))
        form = rng.randrange(5)
        return [f"you have {n} new messages", f"you have {n} old messages", f"you are caller number {n}",
                f"message number {n}", f"there are {n} people waiting"][form]

    def _time(self, rng):
        if rng.random() < 0.5:
            m = rng.randint(0, 59)
            mm = "o'clock" if m == 0 else (f"oh {ONES[m]}" if m < 10 else _number(m))
            return f"the time is {_number(rng.randint(1, 12))} {mm} {rng.choice(['a m', 'p m'])}"
        return f"{rng.choice(WEEKDAYS)} {rng.choice(MONTHS)} {rng.choice(ORDINALS)}"

    def _spelling(self, rng):
        if rng.random() < 0.5:
            return " ".join(rng.choice(NATO) for _ in range(rng.randint(2, 6)))
        i = rng.randrange(26)
        return f"{chr(65 + i)} as in {NATO[i]}"

