"""fedaqt.quant — the core: codes + scales, int4 packing, STE, scale gradient / relay, native quantized layers,
the quantizable-layer registry, model conversion, and the wire encodings to/from Flower records
(spec/METHODS.md sections 1 and 2).

This package imports nothing from other fedaqt packages (dependencies point toward it).
"""

from .convert import (
    IncludeFn,
    convert_to_quantized,
    load_float_state,
    model_gradients,
    quant_layers,
    quantized_weight_keys,
    zero_quant_grads,
)
from .layers import (
    ACT_BITS,
    QuantConv1d,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    QuantMultiheadAttention,
    WeightGradHook,
)
from .registry import (
    LayerHandler,
    MultiheadAttentionHandler,
    QuantConfig,
    QuantHandler,
    handler_for,
    has_quantizable_parameter,
    register_quantized_layer,
    registered_quantized_layers,
    unregister_quantized_layer,
)
from .pack import pack_int4, packed_int4_nbytes, unpack_int4
from .quantize import (
    GRANULARITIES,
    SUPPORTED_BITS,
    Granularity,
    broadcast_scale,
    compute_scale,
    default_eps,
    dequantize,
    fake_quant,
    fake_quant_activation,
    fake_quantize,
    max_abs_mask,
    qmax,
    quantize,
    quantize_activation,
    relay_correction,
    ste_round,
)
from .uplink import UPLINK_BITS, decode_update, encode_tensor_uplink, encode_update, stochastic_round_int8
from .wire import (
    BROADCAST_BITS,
    SCALE_SUFFIX,
    WIRE_FORMAT,
    QTensor,
    decode_broadcast,
    encode_broadcast,
    expected_payload_bytes,
    load_broadcast,
    load_client_broadcast,
    npy_header_nbytes,
    record_nbytes,
)

__all__ = [
    # quantize
    "Granularity", "GRANULARITIES", "SUPPORTED_BITS", "qmax", "default_eps", "compute_scale", "broadcast_scale",
    "quantize", "dequantize", "fake_quantize", "ste_round", "fake_quant", "quantize_activation",
    "fake_quant_activation", "max_abs_mask", "relay_correction",
    # pack
    "pack_int4", "unpack_int4", "packed_int4_nbytes",
    # layers
    "ACT_BITS", "QuantLayer", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantMultiheadAttention",
    "WeightGradHook",
    # registry
    "QuantConfig", "QuantHandler", "LayerHandler", "MultiheadAttentionHandler", "register_quantized_layer",
    "unregister_quantized_layer", "registered_quantized_layers", "handler_for", "has_quantizable_parameter",
    # convert
    "IncludeFn", "convert_to_quantized", "quant_layers", "quantized_weight_keys", "model_gradients",
    "zero_quant_grads", "load_float_state",
    # wire
    "WIRE_FORMAT", "SCALE_SUFFIX", "BROADCAST_BITS", "QTensor", "encode_broadcast", "decode_broadcast",
    "record_nbytes", "npy_header_nbytes", "expected_payload_bytes", "load_broadcast",
    "load_client_broadcast",
    # uplink
    "UPLINK_BITS", "encode_update", "encode_tensor_uplink", "decode_update",
    "stochastic_round_int8",
]
