"""ASR workload: quantized Conformer CTC on a LibriSpeech-layout corpus, one speaker per client (spec §2).

Options: :class:`ASROptions` (``fedaqt plugins show asr``). Data: ``options.data_dir`` in LibriSpeech layout with a ``train`` subset (client speakers) and a ``dev`` subset
(held-out speakers for evaluation). ``fedaqt data speech --out DIR`` builds the default synthesized corpus; a
real LibriSpeech download works with ``options.train_subset`` / ``options.eval_subset`` (e.g. ``train-clean-100``,
``dev-clean``). The server also reports WER/CER on real recorded speech (the asterisk prompts) when installed.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jiwer
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from pydantic import Field
from torch import nn

from fedaqt.config import RunConfig
from fedaqt.data.speech import CHARSET, Utterance, load_audio, normalize_transcript, scan_librispeech
from fedaqt.models.conformer_asr import SIZES, ConformerCTC, is_encoder_matrix
from fedaqt.options import BaseOptions
from fedaqt.workloads.base import Workload

log = logging.getLogger("fedaqt.asr")

SAMPLE_RATE = 16000
N_MELS = 80
BLANK = 0
#: index 0 is the CTC blank; characters follow in CHARSET order.
VOCAB = ["<blank>"] + list(CHARSET)
_CHAR_TO_ID = {c: i + 1 for i, c in enumerate(CHARSET)}


#: upper edge of the Mel filterbank (Hz): narrowband (telephone) features. The real-speech test set and the
#: phone corpus' client speakers are 8 kHz telephone-band audio; with 0–8 kHz filters the empty upper bands shift
#: every normalized feature, and a model trained on wideband speech reads its own training utterances through the
#: telephone channel at WER 0.97 instead of 0.44 (measured, tiny Conformer, 800 steps).
F_MAX = 4000.0


class LogMel(nn.Module):
    """Waveform float [T] at 16 kHz -> normalized log-Mel features float [frames, 80] (10 ms hop, 25 ms window, 512-point FFT,
    80 Mel filters over 0–``F_MAX`` Hz).

    torchaudio's MelSpectrogram, log with a floor, then per-utterance mean/variance normalization.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=512, win_length=400, hop_length=160, n_mels=N_MELS, f_max=F_MAX
        )

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.log(self.mel(wav) + 1e-6).transpose(0, 1)  # [frames, n_mels]
        return (spec - spec.mean(0, keepdim=True)) / (spec.std(0, keepdim=True) + 1e-5)


def encode_text(text: str) -> list[int]:
    """Normalized transcript -> label ids (1..len(CHARSET)); characters outside CHARSET are dropped."""
    return [_CHAR_TO_ID[c] for c in normalize_transcript(text) if c in _CHAR_TO_ID]


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best-path CTC decoding.

    Args:
        log_probs: float [B, T, V] (blank = 0).
        lengths: int64 [B] valid frames.

    Returns:
        B strings: argmax per frame, repeats merged, blanks removed, whitespace normalized.
    """
    best = log_probs.argmax(-1).cpu().numpy()
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids = row[:n]
        keep = ids[(ids != BLANK) & np.concatenate([[True], ids[1:] != ids[:-1]])]
        out.append(" ".join("".join(VOCAB[i] for i in keep).split()))
    return out


def wer_cer(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus WER and CER (jiwer), both as fractions (1.0 = 100%). Empty hypotheses count as all deletions."""
    refs = [r if r.strip() else "<empty>" for r in references]
    hyps = [h if h.strip() else "" for h in hypotheses]
    return float(jiwer.wer(refs, hyps)), float(jiwer.cer(refs, hyps))


def collate(items: list[tuple[torch.Tensor, list[int], str]]) -> dict[str, Any]:
    """(features [T,F], label ids, transcript) list -> padded batch dict."""
    feats = nn.utils.rnn.pad_sequence([f for f, _, _ in items], batch_first=True)
    return {
        "feats": feats,
        "feat_lengths": torch.tensor([f.shape[0] for f, _, _ in items], dtype=torch.long),
        "targets": torch.tensor([i for _, ids, _ in items for i in ids], dtype=torch.long),
        "target_lengths": torch.tensor([len(ids) for _, ids, _ in items], dtype=torch.long),
        "texts": [t for _, _, t in items],
    }


@lru_cache(maxsize=8)
def _scan(root: str, subset: str) -> dict[str, list[Utterance]]:
    return scan_librispeech(root, subset)


class ASROptions(BaseOptions):
    """Options of the ASR workload (``-o KEY=VALUE``; ``--data-dir``, ``--model-size``, ``--real-eval``,
    ``--real-eval-max``, ``--partition`` are shortcuts for the first five)."""

    data_dir: str = Field("data/speech", min_length=1, description="speech corpus directory (LibriSpeech layout)")
    model_size: Literal[tuple(SIZES)] = Field("tiny", description="Conformer size preset")  # type: ignore[valid-type]
    real_eval: bool = Field(True, description="also evaluate WER/CER on real recorded speech (asterisk prompts)")
    real_eval_max: int = Field(120, ge=1, description="at most this many real-speech utterances")
    partition: Literal["speaker"] = Field("speaker", description="client data: the training speakers, dealt round-robin")
    train_subset: str = Field("train", min_length=1, description="LibriSpeech subset of the client speakers")
    eval_subset: str = Field("dev", min_length=1, description="LibriSpeech subset of the held-out evaluation speakers")
    eval_max: int = Field(64, ge=1, description="evaluation utterances (the same number from every held-out speaker)")
    speaker_offset: int = Field(0, ge=0, description="clients use the sorted training speakers from this index on")
    init_checkpoint: str = Field("", description="float state_dict (torch.save) to start from ('' = random init)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout probability of the Conformer")


class ASRWorkload(Workload):
    """Quantized Conformer CTC ASR; clients are training speakers, evaluation on held-out speakers."""

    name = "asr"
    description = "Conformer CTC speech recognition (torchaudio); one speaker per client; WER/CER"
    eval_columns = ("eval_loss", "eval_wer", "eval_cer", "real_wer", "real_cer")
    default_eval_every = 25  # decoding ~180 utterances costs several rounds of training on 2 cores

    Options = ASROptions

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        o = self.options
        self.data_dir: str = o.data_dir
        self.train_subset = o.train_subset
        self.eval_subset = o.eval_subset
        self.eval_max = o.eval_max
        # clients use the sorted training speakers from ``speaker_offset`` on (e.g. the second half for fine-tuning)
        self.speaker_offset = o.speaker_offset
        # a float state_dict (``torch.save``) to start from, e.g. a centrally pretrained model
        self.init_checkpoint = o.init_checkpoint
        self.featurizer = LogMel()
        self._feature_cache: dict[str, torch.Tensor] = {}
        self._real_eval: list[tuple[torch.Tensor, list[int], str]] | None = None

    # ------------------------------------------------------------------ data
    @property
    def speakers(self) -> dict[str, list[Utterance]]:
        return _scan(str(Path(self.data_dir).resolve()), self.train_subset)

    def prepare(self) -> None:
        root = Path(self.data_dir)
        for subset in (self.train_subset, self.eval_subset):
            if not (root / subset).is_dir():
                raise FileNotFoundError(
                    f"speech data not found: {root / subset} does not exist. Build the default corpus with "
                    f"`fedaqt data speech --out {root}` (scripts/setup.sh does this), or pass --data-dir pointing "
                    "at a LibriSpeech-layout directory (with options train_subset/eval_subset)."
                )
        n_spk = len(self.speakers)
        if n_spk == 0:
            raise FileNotFoundError(f"no usable speakers under {root / self.train_subset}")
        n_spk -= self.speaker_offset
        if self.config.num_clients > n_spk:
            raise ValueError(
                f"num_clients={self.config.num_clients} exceeds the {n_spk} training speakers in {root}"
                f"{f' after speaker_offset={self.speaker_offset}' if self.speaker_offset else ''}; "
                f"use --num-clients {max(n_spk, 0)} or fewer (one or more speakers per client)"
            )
        if self.init_checkpoint and not Path(self.init_checkpoint).is_file():
            raise FileNotFoundError(f"options.init_checkpoint={self.init_checkpoint!r} does not exist")

    def num_partitions(self) -> int:
        return self.config.num_clients

    def client_utterances(self, client_id: int) -> list[Utterance]:
        """Speakers are dealt round-robin to clients in sorted order: client i gets speakers i, i+N, ..."""
        spk = sorted(self.speakers)[self.speaker_offset :]
        mine = spk[client_id :: self.config.num_clients]
        return [u for s in mine for u in self.speakers[s]]

    def _features(self, utt: Utterance) -> torch.Tensor:
        feats = self._feature_cache.get(utt.utt_id)
        if feats is None:
            feats = self.featurizer(load_audio(utt.path, SAMPLE_RATE))
            self._feature_cache[utt.utt_id] = feats
        return feats

    def client_batches(self, client_id: int, round_num: int, num_batches: int, batch_size: int) -> list[Any]:
        utts = self.client_utterances(client_id)
        if not utts:
            raise ValueError(f"client {client_id} has no utterances")
        rng = np.random.default_rng([self.config.seed, client_id, round_num])
        batches = []
        for _ in range(num_batches):
            idx = rng.choice(len(utts), size=batch_size, replace=len(utts) < batch_size)
            items = []
            for i in idx:
                u = utts[int(i)]
                items.append((self._features(u), encode_text(u.transcript), u.transcript))
            batches.append(collate(items))
        return batches

    def partition_size(self, client_id: int) -> int:
        """Utterances of client ``client_id`` (its speakers')."""
        return len(self.client_utterances(client_id))

    def client_epoch_batches(self, client_id: int, round_num: int, epoch: int, batch_size: int) -> list[Any]:
        """Every utterance of the client once, permuted by (seed, client, round, epoch), in batches of
        ``batch_size`` (the last may be smaller); same batch format as :meth:`client_batches`.

        Raises:
            ValueError: the client has no utterances, or ``batch_size < 1``.
        """
        utts = self.client_utterances(client_id)
        if not utts:
            raise ValueError(f"client {client_id} has no utterances")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        order = np.random.default_rng([self.config.seed, client_id, round_num, epoch, 0x45504F]).permutation(len(utts))
        batches = []
        for i in range(0, len(order), batch_size):
            items = []
            for j in order[i : i + batch_size]:
                u = utts[int(j)]
                items.append((self._features(u), encode_text(u.transcript), u.transcript))
            batches.append(collate(items))
        return batches

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        model = ConformerCTC(N_MELS, len(VOCAB), size=self.options.model_size, dropout=self.options.dropout)
        if self.init_checkpoint:
            model.load_state_dict(torch.load(self.init_checkpoint, map_location="cpu", weights_only=True))
        return model

    def quantize_filter(self, name: str, module: nn.Module) -> bool:
        return is_encoder_matrix(name, module)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        log_probs, out_lengths = model(batch["feats"], batch["feat_lengths"])
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            batch["targets"],
            out_lengths,
            batch["target_lengths"],
            blank=BLANK,
            reduction="mean",
            zero_infinity=True,
        )
        return loss, int(batch["feats"].shape[0])

    # ------------------------------------------------------------------ evaluation
    def _eval_items(self) -> list[tuple[torch.Tensor, list[int], str]]:
        by_speaker = _scan(str(Path(self.data_dir).resolve()), self.eval_subset)
        per = max(1, self.eval_max // max(1, len(by_speaker)))  # the same number from every held-out speaker
        utts = [u for s in sorted(by_speaker) for u in by_speaker[s][:per]]
        return [(self._features(u), encode_text(u.transcript), u.transcript) for u in utts]

    def _real_items(self) -> list[tuple[torch.Tensor, list[int], str]]:
        if self._real_eval is None:
            from fedaqt.data.asterisk import asterisk_available, load_asterisk_eval

            if not asterisk_available():
                log.warning("asterisk prompts not installed; real_wer/real_cer are not reported")
                self._real_eval = []
            else:
                data = load_asterisk_eval(target_sr=SAMPLE_RATE, max_utterances=self.options.real_eval_max)
                self._real_eval = [(self.featurizer(w), encode_text(t), t) for _, w, t in data]
        return self._real_eval

    @torch.no_grad()
    def decode_items(self, model: nn.Module, items, batch_size: int = 16) -> tuple[float, list[str], list[str]]:
        """Greedy-decode items; returns (mean CTC loss, references, hypotheses)."""
        model.eval()
        refs, hyps, losses = [], [], []
        for start in range(0, len(items), batch_size):
            batch = collate(items[start : start + batch_size])
            loss, _ = self.loss(model, batch)
            log_probs, out_lengths = model(batch["feats"], batch["feat_lengths"])
            losses.append(float(loss))
            hyps += ctc_greedy_decode(log_probs, out_lengths)
            refs += batch["texts"]
        return float(np.mean(losses)) if losses else float("nan"), refs, hyps

    def evaluate(self, model: nn.Module, round_num: int) -> dict[str, float]:
        loss, refs, hyps = self.decode_items(model, self._eval_items())
        wer, cer = wer_cer(refs, hyps)
        out = {"eval_loss": loss, "eval_wer": wer, "eval_cer": cer}
        if self.options.real_eval:
            items = self._real_items()
            if items:
                _, refs, hyps = self.decode_items(model, items)
                out["real_wer"], out["real_cer"] = wer_cer(refs, hyps)
        return out

    def describe(self) -> dict[str, Any]:
        sizes = [len(self.client_utterances(c)) for c in range(self.config.num_clients)]
        return {"train_speakers": len(self.speakers), "speaker_offset": self.speaker_offset, "utterances_per_client": sizes}
