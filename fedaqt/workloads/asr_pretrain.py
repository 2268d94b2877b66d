"""Central pretraining of the float Conformer CTC (spec §2.5: federated fine-tuning of a pretrained recognizer).

AdamW on the float model over the utterances of the first ``speakers`` sorted training speakers of ``data_dir``
(batches drawn uniformly from all of them; linear warm-up then cosine decay of the learning rate to 5 % of
``lr``); the federated clients then use the speakers from ``speakers`` on (``options.speaker_offset``), so
pretraining and federated data are disjoint. In the default phone-domain corpus the first 48 training speakers
are its 16 kHz pretraining speakers (``fedaqt.data.corpus.plan_phone_speakers``). Writes ``<out_dir>/pretrained.pt`` (float state_dict, ``torch.save``) and
``<out_dir>/pretrained.json`` (recipe, corpus fingerprint, learning curve, evaluation of the pretrained model).
A second call with the same recipe and corpus reuses the checkpoint (no training).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import math

import numpy as np
import torch

from fedaqt.config import RunConfig
from fedaqt.workloads.asr import ASRWorkload, collate, encode_text

#: where ``fedaqt pretrain`` writes by default and where ``fedaqt run`` looks for the checkpoint
DEFAULT_DIR = "runs/pretrained"
CHECKPOINT_NAME = "pretrained.pt"
METRICS_NAME = "pretrained.json"


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything the checkpoint depends on besides the corpus (part of the cache key)."""

    data_dir: str = "data/speech"
    speakers: int = 48
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    model_size: str = "tiny"
    dropout: float = 0.0
    clip: float = 5.0
    warmup: int = 100
    weight_decay: float = 1e-2


#: issue 11: the federated fine-tuning recipe of a `fedaqt run` that starts from the pretrained checkpoint (each key
#: only where the preset, config file and command line leave it unset, :func:`finetune_defaults`). Server Adam
#: (Flower FedAdam, bias-corrected; tau 1e-8 and beta_2 0.999 as torch.optim.Adam) at 1e-3 with a cosine decay
#: over the rounds on the mean FedSGD gradient of 8 clients, no dropout: measured with
#: bench/asr_finetune_proxy.py (session 14, in-process, float: held-out WER 0.333 -> 0.257 after 100 rounds ->
#: 0.274 after 200); server SGD (momentum 0.9 at 0.05, the core default, cosine) reached 0.316 after 100 rounds
#: at int4 (bench/relay_ablation.py). Random-init runs (--from-scratch) keep the core defaults.
FINETUNE_SERVER = {"strategy": "fedadam", "server_lr": 1e-3}
FINETUNE_SERVER_OPTIONS = {"tau": 1e-8, "beta_2": 0.999, "server_lr_schedule": "cosine"}
FINETUNE_RUN = {"rounds": 200}
FINETUNE_OPTIONS = {"dropout": 0.0}


def finetune_defaults(run_keys: set[str], option_keys: set[str]) -> dict:
    """The :data:`FINETUNE_SERVER`/``_RUN``/``_OPTIONS`` values for keys the user did not set.

    The server-optimizer group (strategy, its learning rate, tau, beta_2, schedule) applies only when the strategy
    was not chosen: ``--strategy fedsgd`` keeps fedsgd's own learning rate and options.

    Args:
        run_keys, option_keys: the keys set explicitly (:func:`fedaqt.config.explicit_keys`).

    Returns:
        a mapping for ``RunConfig.override`` without ``options``, and ``"options"``: the option values to add.
    """
    values: dict = {k: v for k, v in FINETUNE_RUN.items() if k not in run_keys}
    options = {k: v for k, v in FINETUNE_OPTIONS.items() if k not in option_keys}
    if "strategy" not in run_keys:
        values.update({k: v for k, v in FINETUNE_SERVER.items() if k not in run_keys})
        options.update({k: v for k, v in FINETUNE_SERVER_OPTIONS.items() if k not in option_keys})
    return {**values, "options": options}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warm-up over ``warmup`` steps, then cosine
    decay over ``steps`` down to a floor of 0.05."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * max(0.05, 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, steps)))))


def corpus_fingerprint(data_dir: str) -> str:
    """sha256 over the sorted relative paths and sizes of every file under ``data_dir`` (cheap; no audio read).

    Raises FileNotFoundError if ``data_dir`` is not a directory.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={data_dir!r} is not a directory; build it with `fedaqt data speech --out {data_dir}`")
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def recipe_key(recipe: PretrainRecipe) -> str:
    """sha256 of the recipe and the corpus fingerprint: a checkpoint is reused only when this matches."""
    payload = json.dumps({**asdict(recipe), "data_dir": str(Path(recipe.data_dir).resolve()),
                          "corpus": corpus_fingerprint(recipe.data_dir)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _workload(recipe: PretrainRecipe) -> ASRWorkload:
    cfg = RunConfig(num_clients=recipe.speakers, seed=recipe.seed,
                    options={"dropout": recipe.dropout, "data_dir": recipe.data_dir, "model_size": recipe.model_size})
    workload = ASRWorkload(cfg)
    workload.prepare()
    return workload


def load_metrics(out_dir: str | Path) -> dict | None:
    """The metrics JSON of a checkpoint in ``out_dir``, or None when either file is missing."""
    out = Path(out_dir)
    if not (out / CHECKPOINT_NAME).is_file() or not (out / METRICS_NAME).is_file():
        return None
    return json.loads((out / METRICS_NAME).read_text())


def pretrain(recipe: PretrainRecipe, out_dir: str | Path = DEFAULT_DIR, evaluate: bool = True,
             progress: Callable[[int, float], None] | None = None, force: bool = False) -> dict:
    """Train (or reuse) the central checkpoint; returns the metrics dict also written to ``pretrained.json``.

    Args:
        recipe: the training recipe; ``speakers`` must be below the number of training speakers.
        out_dir: directory of ``pretrained.pt`` / ``pretrained.json``.
        evaluate: also evaluate the pretrained model (held-out speakers + real speech) into the metrics.
        progress: called as ``progress(step, loss)`` after every step.
        force: retrain even when a matching checkpoint exists.

    Returns:
        dict with ``key``, ``recipe``, ``checkpoint`` (path), ``curve`` (list of ``[step, loss]``, one per step),
        ``seconds`` (training wall time), ``eval`` (the workload's evaluation or ``{}``), ``reused`` (bool).

    Raises:
        ValueError: steps/batch_size/speakers < 1 or speakers >= the corpus' training speakers.
        FileNotFoundError: the corpus is missing.
    """
    for name in ("steps", "batch_size", "speakers"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"pretrain {name}={getattr(recipe, name)} must be >= 1")
    probe = ASRWorkload(RunConfig(num_clients=1, options={"data_dir": recipe.data_dir}))
    probe.prepare()
    n_spk = len(probe.speakers)
    if recipe.speakers >= n_spk:
        raise ValueError(f"pretrain speakers={recipe.speakers} must leave training speakers for the federated "
                         f"clients; the corpus {recipe.data_dir} has {n_spk}")
    workload = _workload(recipe)
    out = Path(out_dir)
    key = recipe_key(recipe)
    old = load_metrics(out)
    if old is not None and old.get("key") == key and not force:
        return {**old, "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = workload.build_model()
    model.checkpointing = False
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe.steps, recipe.warmup))
    pool = [u for c in range(recipe.speakers) for u in workload.client_utterances(c)]
    rng = np.random.default_rng([recipe.seed, 0x505245])
    curve: list[list[float]] = []
    t0 = time.time()
    for step in range(1, recipe.steps + 1):
        model.train()
        idx = rng.choice(len(pool), size=recipe.batch_size, replace=len(pool) < recipe.batch_size)
        batch = collate([(workload._features(pool[i]), encode_text(pool[i].transcript), pool[i].transcript) for i in idx])
        loss, _ = workload.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        sched.step()
        curve.append([step, float(loss.item())])
        if progress is not None:
            progress(step, curve[-1][1])
    seconds = time.time() - t0
    ckpt = out / CHECKPOINT_NAME
    torch.save(model.state_dict(), ckpt)
    ev = workload.evaluate(model, 0) if evaluate else {}
    metrics = {"key": key, "recipe": asdict(recipe), "checkpoint": str(ckpt), "curve": curve, "seconds": seconds,
               "eval": {k: float(v) for k, v in ev.items() if isinstance(v, (int, float))}}
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=1))
    return {**metrics, "reused": False}
