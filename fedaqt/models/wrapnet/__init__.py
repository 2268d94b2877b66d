"""WrapNet: quantized networks that tolerate integer overflow in low-bit (e.g. 8-bit) accumulators (spec §3).

Everything in spec §3 (METHODS.md, rebuilt from chapter 2 of the seed dissertation / Ni et al. 2020) lives in this
package, one module per concept (every public name is re-exported here):

* :mod:`.accumulator` wrap, cyclic activation, exact integer accumulation, overflow penalty/rate;
* :mod:`.quantizers` weight/activation quantizers with the STE;
* :mod:`.carries` carry counting, the carry-variance regularizer, packed adds;
* :mod:`.layers` the WrapNet layers, the client's code-holding weights, model-level mode switches and statistics;
* :mod:`.networks` WrapVGG7 / WrapResNet20;
* :mod:`.pipeline` step-size selection, training/evaluation loops, the four-stage and hybrid carry procedures.

In detail:

* §3.1 fixed-point layer: ``wrap_b``; binary (XNOR, per-output-channel ``s_w = mean|w|``), ternary (TWN,
  ``Δ = 0.7 mean|w|``) and uniform multi-bit (§1) weight quantizers with the STE; unsigned a-bit activations
  ``x_q = clamp(round(x/s_x), 0, 2^a-1)``; exact integer accumulation (:func:`int_conv2d`, :func:`int_linear`)
  wrapped to b bits with two's-complement overflow, and a register-level emulation that wraps after every
  addition (:func:`accumulate_register`).
* §3.2 the smooth-modulo cyclic activation :func:`cyclic` (slope ``k``) and the WrapNet layers
  :class:`WrapConv2d` / :class:`WrapLinear`: ``conv(x_q, w_q) -> z_q -> c(z_q) -> x s_w s_x``; the networks add
  ``BN -> ReLU`` and the next layer quantizes with its own fixed ``s_x``.
* §3.3 overflow penalty :func:`overflow_penalty` and rate :func:`overflow_rate` (strict range, §3.7).
* §3.4 step-size selection by target overflow rate: :func:`select_layer_step_size`, :func:`select_step_sizes`.
* §3.5 carries: Algorithm 1 :func:`carry_count` (with the ``1[v<0]`` fix), the closed form, the differentiable
  surrogate, the carry-variance regularizer :class:`CarryVariance` (R_c, EMA running mean), packed adds with
  Python ints with and without buffer bits, and the hybrid procedure :func:`hybrid_carry_finetune`.
* §3.6 the four-stage pipeline :func:`train_pipeline`.
* Networks: :class:`WrapVGG7` and :class:`WrapResNet20` for 28x28x1 and 32x32x3 inputs, first and last layers
  full precision (§3.1), width configurable.
* Federated clients (spec §2.2 applied to WrapNet): :func:`quantize_wrap_layers` replaces each WrapNet layer's
  float weight by a :class:`WrapWeightCodes` child (int8 codes + float32 scale of the int8/int4 broadcast, a
  :class:`fedaqt.quant.layers.QuantLayer`), so the client holds no float copy; the layer binarizes/ternarizes
  ``ŵ = s*q`` with the same quantizer as the float layer, and autograd keeps its integer operands as int8/uint8.

Units: accumulator values ``z_q`` are in integer units (multiples of ``s_w * s_x``); bit-widths are bits.
Mode switches (per layer, set for a whole model with :func:`set_wrapnet_mode` / :func:`wrapnet_mode`):
``act_quant`` (False = float activations, still in integer units once ``s_x`` is set), ``cyclic`` (insert ``c``),
``acc_bits`` (accumulator width used at inference; 32 = no wrap), so the same trained weights can be evaluated
with a 32-bit and a b-bit accumulator.
"""

from __future__ import annotations

from .accumulator import (
    CyclicActivation, accumulate_register, cyclic, cyclic_threshold, int_conv2d, int_linear,
    overflow_mask, overflow_penalty, overflow_rate, wrap_b, wrap_int,
)
from .quantizers import (
    binarize_weight, quantize_activation, quantize_weight, ste_round, ternarize_weight, uniform_quantize_weight,
)
from .carries import (
    CarryVariance, carry_count, carry_count_closed_form, carry_count_surrogate, carry_count_tensor, carry_variance,
    pack_lanes, packed_accumulate, packed_add, packed_add_buffered, sequential_end_around_carries, unpack_lanes,
)
from .layers import (
    WrapConv2d, WrapLinear, WrapWeightCodes, model_carry_regularizer, model_overflow_penalty, overflow_rates,
    quantize_wrap_layers, reset_overflow_stats, set_wrapnet_mode, wrap_layers, wrapnet_mode,
)
from .networks import WrapResNet20, WrapVGG7, build_wrapnet
from .pipeline import (
    StepChoice, calibrate_fixed_bits, evaluate, hybrid_carry_finetune, measure_carries, select_layer_step_size,
    select_step_sizes, train_epochs, train_pipeline,
)

__all__ = [
    "wrap_b", "wrap_int", "cyclic", "cyclic_threshold", "CyclicActivation",
    "ste_round", "binarize_weight", "ternarize_weight", "uniform_quantize_weight", "quantize_weight",
    "quantize_activation", "int_conv2d", "int_linear", "accumulate_register",
    "overflow_penalty", "overflow_rate", "overflow_mask",
    "carry_count", "carry_count_closed_form", "carry_count_tensor", "carry_count_surrogate",
    "sequential_end_around_carries", "carry_variance", "CarryVariance",
    "pack_lanes", "unpack_lanes", "packed_add", "packed_add_buffered", "packed_accumulate",
    "WrapConv2d", "WrapLinear", "WrapWeightCodes", "quantize_wrap_layers", "WrapVGG7", "WrapResNet20", "build_wrapnet",
    "wrap_layers", "set_wrapnet_mode", "wrapnet_mode", "model_overflow_penalty", "model_carry_regularizer",
    "reset_overflow_stats", "overflow_rates", "StepChoice", "select_layer_step_size", "select_step_sizes",
    "calibrate_fixed_bits", "evaluate", "train_epochs", "train_pipeline", "measure_carries",
    "hybrid_carry_finetune",
]
