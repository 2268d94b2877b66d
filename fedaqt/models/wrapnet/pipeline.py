"""WrapNet training procedures: step-size selection by target overflow rate (spec §3.4,
:func:`select_layer_step_size`, :func:`select_step_sizes`, :func:`calibrate_fixed_bits`), evaluation and training
loops, the four-stage pipeline :func:`train_pipeline` (§3.6), and carries at the model level
(:func:`measure_carries`, the hybrid procedure :func:`hybrid_carry_finetune`, §3.5)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .accumulator import NO_WRAP_BITS, _FLOAT32_EXACT, overflow_rate
from .layers import (
    _WrapMixin, model_carry_regularizer, model_overflow_penalty, overflow_rates, reset_overflow_stats,
    set_wrapnet_mode, wrap_layers, wrapnet_mode,
)
from .quantizers import _max_abs_code, quantize_activation


# ============================================================================ §3.4 step-size selection
def _exact_z(layer: _WrapMixin, x_q: torch.Tensor, w_q: torch.Tensor, a: int) -> torch.Tensor:
    """Exact unwrapped integer accumulator of ``layer`` for integer-valued ``x_q``/``w_q``: float32 when every
    partial sum is below 2^24 (exact), else the int64/float64 path of :func:`int_conv2d`/:func:`int_linear`."""
    if _max_abs_code(layer.weight_quant) * (2 ** a - 1) * layer._fan_in() < _FLOAT32_EXACT:
        return torch.round(layer._op(x_q.float(), w_q.float()))
    return layer._int_op(x_q, w_q, 64)


@dataclass
class StepChoice:
    """Result of §3.4 for one layer: chosen bits ``a``, step ``s_x``, its overflow ``rate``, the calibration
    ``clip`` (max ReLU input) and the rate for every bit-width tried (``rates[a]``)."""

    a: int
    s_x: float
    rate: float
    clip: float
    rates: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def select_layer_step_size(layer: _WrapMixin, x: torch.Tensor, b: int | None = None, p: float = 0.05,
                           bit_grid: Sequence[int] = (8, 7, 6, 5, 4, 3, 2, 1)) -> StepChoice:
    """Spec §3.4 for one layer: for ``a`` in ``bit_grid`` (coarsening), ``s_x = clip/(2^a - 1)`` with
    ``clip = max x``; quantize ``x``, compute the exact integer ``z_q`` and its overflow rate against ``b`` bits;
    stop at the first ``a`` with rate ``<= p`` (or the last ``a`` of the grid). Sets ``layer.s_x``/``act_bits``.

    Args:
        layer: a :class:`WrapConv2d` / :class:`WrapLinear`.
        x: float calibration inputs of the layer (post-ReLU), ``[N, ...]``.
        b: accumulator bits (default ``layer.effective_bits``).
        p: target overflow rate in [0, 1].

    Raises:
        ValueError: ``p`` outside [0, 1] or empty grid.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is not allowed; the target overflow rate is a fraction in [0, 1]")
    if not bit_grid:
        raise ValueError("bit_grid is empty")
    b = layer.effective_bits if b is None else b
    w_q, _ = layer.quantized_weight()
    w_q = w_q.detach()
    clip = float(x.max()) if x.numel() else 0.0
    if clip <= 0:  # dead input: any step works, use 1 bit
        a = int(bit_grid[-1])
        layer.s_x.fill_(1.0)
        layer.act_bits.fill_(a)
        return StepChoice(a, 1.0, 0.0, clip, {a: 0.0})
    rates: dict[int, float] = {}
    chosen = None
    for a in bit_grid:
        s = clip / (2 ** a - 1)
        x_q = quantize_activation(x, s, int(a))
        z = _exact_z(layer, x_q, w_q, int(a))
        rates[int(a)] = overflow_rate(z, b)
        chosen = (int(a), s)
        if rates[int(a)] <= p:
            break
    a, s = chosen
    layer.s_x.fill_(s)
    layer.act_bits.fill_(a)
    return StepChoice(a, s, rates[a], clip, rates)


def _collect_inputs(model: nn.Module, batches: Iterable, use_batch_stats: bool) -> dict[str, torch.Tensor]:
    layers = wrap_layers(model)
    store: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, inp, n=n: store[n].append(inp[0].detach()))
             for n, layer in layers]
    was_training = model.training
    bn_saved = []
    try:
        model.eval()
        if use_batch_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    bn_saved.append((m, m.momentum, copy.deepcopy(m.state_dict())))
                    m.momentum = 0.0
                    m.train()
        with torch.no_grad(), wrapnet_mode(model, act_quant=False, cyclic=False, acc_bits=NO_WRAP_BITS,
                                           track_carries=False, carry_mode="none"):
            saved_steps = [(layer, layer.s_x.clone()) for _, layer in layers]
            for _, layer in layers:
                layer.s_x.zero_()  # stage-1 behaviour: float activations
            try:
                for batch in batches:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    model(x)
            finally:
                for layer, s in saved_steps:
                    layer.s_x.copy_(s)
    finally:
        for h in hooks:
            h.remove()
        for m, mom, state in bn_saved:
            m.momentum = mom
            m.load_state_dict(state)
        model.train(was_training)
    return {n: torch.cat(v) for n, v in store.items() if v}


def select_step_sizes(model: nn.Module, calib_batches: Iterable, b: int | None = None, p: float = 0.05,
                      bit_grid: Sequence[int] = (8, 7, 6, 5, 4, 3, 2, 1),
                      use_batch_stats: bool = False) -> dict[str, StepChoice]:
    """Spec §3.4 for every WrapNet layer, on the float-activation network (pipeline stage 2).

    Runs ``calib_batches`` (iterable of ``x`` or ``(x, y)``; float images) through the model with float
    activations and no cyclic layer, records each WrapNet layer's input, and calls
    :func:`select_layer_step_size` per layer. The chosen ``s_x`` and ``a`` are frozen into the layers.

    Args:
        b: accumulator bits (default: each layer's ``effective_bits``).
        use_batch_stats: use batch statistics in BatchNorm (for an untrained model whose running statistics are
            still the identity); running statistics are left unchanged.

    Returns:
        {layer name: :class:`StepChoice`}; the median of the ``a`` values is the "Bits" column of Table 2.3.
    """
    inputs = _collect_inputs(model, calib_batches, use_batch_stats)
    return {n: select_layer_step_size(layer, inputs[n], b, p, bit_grid)
            for n, layer in wrap_layers(model) if n in inputs}


def calibrate_fixed_bits(model: nn.Module, calib_batches: Iterable, a: int, b: int | None = None,
                         use_batch_stats: bool = False) -> dict[str, StepChoice]:
    """Baseline quantized activations (BWN-QA/TWN-QA, Table 2.6): every layer gets ``a`` bits and
    ``s_x = max x / (2^a - 1)`` regardless of overflow (rates against ``b`` are still reported)."""
    return select_step_sizes(model, calib_batches, b=b, p=1.0, bit_grid=(a,), use_batch_stats=use_batch_stats)


# ============================================================================ training and evaluation
@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, **modes: Any) -> dict[str, Any]:
    """Accuracy and overflow rates of ``model`` on ``batches`` of ``(x, y)`` under temporary ``modes`` (e.g.
    ``acc_bits=8``). Returns {"accuracy": float in [0, 1], "overflow_rate": mean over layers, "overflow_rates":
    {layer: rate}, "n": examples}."""
    was = model.training
    model.eval()
    correct = total = 0
    with wrapnet_mode(model, **modes):
        reset_overflow_stats(model)
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
        rates = overflow_rates(model)
    model.train(was)
    return {"accuracy": correct / max(total, 1), "overflow_rate": float(np.mean(list(rates.values()))) if rates else 0.0,
            "overflow_rates": rates, "n": total}


def train_epochs(model: nn.Module, train_loader: Iterable, epochs: float, lr: float = 1e-3,
                 lambda_o: float = 0.0, lambda_c: float = 0.0, weight_decay: float = 0.0,
                 log: Callable[[str], None] | None = None, tag: str = "") -> list[float]:
    """Adam (spec §3.6) with a cosine learning-rate decay over ``epochs`` passes of ``train_loader`` (an
    iterable of ``(x, y)`` that can be iterated repeatedly; fractional epochs stop early). Loss
    ``CE + λ_o R_o + λ_c R_c``. Returns the mean loss of each epoch."""
    if epochs <= 0:
        return []
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = int(math.ceil(epochs * steps_per_epoch)) if steps_per_epoch else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if total else None
    model.train()
    history, step = [], 0
    for ep in range(int(math.ceil(epochs))):
        losses = []
        for x, y in train_loader:
            if total is not None and step >= total:
                break
            loss = F.cross_entropy(model(x), y)
            if lambda_o:
                loss = loss + lambda_o * model_overflow_penalty(model)
            if lambda_c:
                loss = loss + lambda_c * model_carry_regularizer(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            step += 1
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if log:
            log(f"{tag} epoch {ep + 1}: loss {history[-1]:.4f}")
    return history


def train_pipeline(model: nn.Module, train_loader: Iterable, calib_batches: Sequence, *, b: int = 8,
                   p: float = 0.05, k: float = 2.0, epochs: Sequence[float] = (2, 1, 1), lr: float = 1e-3,
                   lambda_o: float = 0.01, lambda_c: float = 0.0, track_carries: bool = False,
                   bit_grid: Sequence[int] = (8, 7, 6, 5, 4, 3, 2, 1), eval_fn: Callable[[nn.Module], Any] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The four-stage WrapNet pipeline (spec §3.6), small-scale defaults (Adam lr 1e-3, cosine decay per stage).

    1. pre-train with quantized weights and float activations, no cyclic layers (``epochs[0]``; 0 skips it,
       e.g. to reuse an already pre-trained model);
    2. select per-layer ``s_x`` for overflow rate ``p`` at ``b`` bits (§3.4) on ``calib_batches``;
    3. insert ``c(.)`` (slope ``k``) and warm up with float activations (``epochs[1]``);
    4. fine-tune with quantized weights and activations, loss ``CE + λ_o R_o (+ λ_c R_c)`` (``epochs[2]``).

    Args:
        model: a WrapNet network (:class:`WrapVGG7`, :class:`WrapResNet20`, ...), modified in place.
        train_loader: re-iterable of ``(x float [B, C, H, W], y int64 [B])``.
        calib_batches: sequence of ``(x, y)`` or ``x`` for §3.4.
        eval_fn: optional ``eval_fn(model)`` called after stages 1, 3 and 4; its results are returned.

    Every WrapNet layer's ``b`` and ``k`` are set to the given values; the model ends in the fine-tuning modes
    (``act_quant=True``, ``cyclic=True``, 32-bit accumulator; evaluate with ``acc_bits=b`` for the b-bit result).

    Returns:
        {"steps": {layer: StepChoice}, "median_bits": float, "losses": {stage: [per-epoch loss]},
        "evals": {stage: eval_fn result}}.
    """
    out: dict[str, Any] = {"losses": {}, "evals": {}}
    for _, layer in wrap_layers(model):
        layer.b, layer.k = b, k
    set_wrapnet_mode(model, act_quant=False, cyclic=False, acc_bits=NO_WRAP_BITS, track_carries=False)
    out["losses"]["pretrain"] = train_epochs(model, train_loader, epochs[0], lr, log=log, tag="[1 pretrain]")
    if eval_fn and epochs[0]:
        out["evals"]["pretrain"] = eval_fn(model)
    steps = select_step_sizes(model, calib_batches, b, p, bit_grid)
    out["steps"] = steps
    out["median_bits"] = float(np.median([c.a for c in steps.values()])) if steps else float("nan")
    if log:
        log("[2 step sizes] " + ", ".join(f"{n}: a={c.a} rate={c.rate:.3%}" for n, c in steps.items()))
    set_wrapnet_mode(model, cyclic=True, act_quant=False)
    out["losses"]["warmup"] = train_epochs(model, train_loader, epochs[1], lr, log=log, tag="[3 warm-up]")
    if eval_fn:
        out["evals"]["warmup"] = eval_fn(model)
    set_wrapnet_mode(model, cyclic=True, act_quant=True, track_carries=track_carries or bool(lambda_c))
    out["losses"]["finetune"] = train_epochs(model, train_loader, epochs[2], lr, lambda_o=lambda_o,
                                             lambda_c=lambda_c, log=log, tag="[4 fine-tune]")
    if eval_fn:
        out["evals"]["finetune"] = eval_fn(model)
    return out


# ============================================================================ §3.5 carries at the model level
@torch.no_grad()
def measure_carries(model: nn.Module, batches: Iterable) -> dict[str, dict[str, float]]:
    """Carry statistics per WrapNet layer (quantized activations required): {layer: {"mean": mean carries per
    neuron, "std": mean over neurons of the per-neuron std over images}} (Table 2.5 columns)."""
    layers = wrap_layers(model)
    acc: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    was = model.training
    model.eval()
    with wrapnet_mode(model, track_carries=True):
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            for n, layer in layers:
                if layer.last_carries is not None:
                    acc[n].append(layer.last_carries.flatten(1).float())
                    layer.last_carries = None
    model.train(was)
    out = {}
    for n, chunks in acc.items():
        if chunks:
            c = torch.cat(chunks)
            out[n] = {"mean": float(c.mean()), "std": float(c.std(dim=0, unbiased=False).mean())}
    return out


def hybrid_carry_finetune(model: nn.Module, train_loader: Iterable, calib_batches: Sequence,
                          eval_fn: Callable[[nn.Module], float], *, steps_epochs: float = 0.25,
                          lambda_c: float = 1e-3, lambda_o: float = 0.01, lr: float = 1e-4, tol: float = 0.01,
                          p: float = 0.05, lanes: int = 4, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Hybrid bit-packing procedure (spec §3.5), on a fine-tuned WrapNet (stage 4 state).

    1. Measure each layer's carry std (:func:`measure_carries`) and order layers from smallest to largest.
    2. Layer by layer in that order: simulate neighbor-lane carries (with the ``round(m_hat)`` correction) and
       R_c on it, fine-tune ``steps_epochs`` epochs, evaluate with ``eval_fn(model) -> accuracy``. If accuracy
       falls more than ``tol`` below the carry-free baseline, undo that layer (restore its weights) and stop.
    3. Give the remaining layers a buffer bit (7-bit lanes: wrap/cyclic at b-1 bits), re-select their ``s_x``
       for overflow rate ``p`` at b-1 bits, fine-tune ``steps_epochs`` epochs.

    Returns:
        {"order": [layers], "carry_layers": [...], "buffer_layers": [...], "baseline": acc, "accuracies":
        {layer: acc after adding it}, "final": acc, "carry_stats": measure_carries output}.
    """
    set_wrapnet_mode(model, act_quant=True, cyclic=True)
    for _, layer in wrap_layers(model):
        layer.carry_lanes = lanes
    stats = measure_carries(model, calib_batches)
    order = sorted(stats, key=lambda n: stats[n]["std"])
    named = dict(wrap_layers(model))
    baseline = float(eval_fn(model))
    out: dict[str, Any] = {"order": order, "carry_layers": [], "buffer_layers": [], "baseline": baseline,
                           "accuracies": {}, "carry_stats": stats}
    for n in order:
        saved = copy.deepcopy(model.state_dict())
        layer = named[n]
        layer.track_carries, layer.carry_mode = True, "simulate"
        train_epochs(model, train_loader, steps_epochs, lr, lambda_o=lambda_o, lambda_c=lambda_c, log=log,
                     tag=f"[hybrid carries {n}]")
        acc = float(eval_fn(model))
        out["accuracies"][n] = acc
        if acc < baseline - tol:
            model.load_state_dict(saved)
            layer.track_carries, layer.carry_mode = False, "none"
            break
        out["carry_layers"].append(n)
    rest = [n for n in order if n not in out["carry_layers"]]
    if rest:
        for n in rest:
            named[n].carry_mode = "buffer"
        inputs = _collect_inputs(model, calib_batches, use_batch_stats=False)
        for n in rest:
            select_layer_step_size(named[n], inputs[n], None, p)
        train_epochs(model, train_loader, steps_epochs, lr, lambda_o=lambda_o, lambda_c=lambda_c, log=log,
                     tag="[hybrid buffer bits]")
    out["buffer_layers"] = rest
    out["final"] = float(eval_fn(model))
    return out
