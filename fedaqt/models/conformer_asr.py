"""Conformer CTC acoustic model built on ``torchaudio.models.Conformer`` (spec §2.1, §2.5).

Layout (the names matter: the quantizer selects layers by qualified name):

* ``frontend``: frame stacking (``stack`` log-Mel frames -> one, i.e. ``stack``x subsampling) + ``nn.Linear`` to
  ``d_model``. Encoder matrix: quantized.
* ``encoder``: ``torchaudio.models.Conformer`` with GroupNorm in the conv module (no BatchNorm running statistics,
  so a FedSGD client step is a pure function of the broadcast weights). Its Linear/Conv1d/MultiheadAttention
  matrices are quantized.
* ``head``: ``nn.Linear(d_model, vocab)`` CTC head. Stays float (the "decoder" of spec §2.1).

Gradient checkpointing (spec §2.2 step 2) wraps every sub-module of every Conformer block (``"sublayer"``, the
default) or every whole block (``"layer"``) with ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``;
set ``model.checkpointing`` and ``model.checkpoint_granularity``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchaudio.models import Conformer


@dataclass(frozen=True)
class ConformerSize:
    """Hyper-parameters of one model size preset."""

    d_model: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    kernel_size: int


#: Model size presets. ``tiny`` trains on two CPU cores in minutes; ``large`` (~36M parameters) is large enough
#: that weights dominate client memory (memory profiling, issue 4).
SIZES: dict[str, ConformerSize] = {
    "tiny": ConformerSize(d_model=144, num_heads=4, ffn_dim=576, num_layers=4, kernel_size=15),
    "small": ConformerSize(d_model=256, num_heads=4, ffn_dim=1024, num_layers=8, kernel_size=31),
    "large": ConformerSize(d_model=512, num_heads=8, ffn_dim=2048, num_layers=6, kernel_size=31),
}


class ConformerCTC(nn.Module):
    """Log-Mel features -> per-frame character log-probabilities.

    Args:
        n_mels: feature dimension F of the input.
        vocab_size: CTC output size V including the blank at index 0.
        size: a :data:`SIZES` key.
        stack: frames stacked into one encoder frame (time subsampling factor).
        dropout: dropout inside the Conformer blocks.

    Raises:
        ValueError: unknown ``size``.
    """

    def __init__(self, n_mels: int, vocab_size: int, size: str = "tiny", stack: int = 4, dropout: float = 0.1):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of: {', '.join(SIZES)}")
        hp = SIZES[size]
        self.hparams = {"n_mels": n_mels, "vocab_size": vocab_size, "size": size, "stack": stack, **asdict(hp)}
        self.stack = stack
        self.frontend = nn.Linear(n_mels * stack, hp.d_model)
        self.encoder = Conformer(
            input_dim=hp.d_model,
            num_heads=hp.num_heads,
            ffn_dim=hp.ffn_dim,
            num_layers=hp.num_layers,
            depthwise_conv_kernel_size=hp.kernel_size,
            dropout=dropout,
            use_group_norm=True,
        )
        self.head = nn.Linear(hp.d_model, vocab_size)
        self.checkpointing = True
        #: "sublayer": each half-step FFN, the attention block and the convolution module of a Conformer block is
        #: its own checkpoint segment, so backward recomputes and holds one sub-module's activations at a time
        #: (plus 4 [T, B, D] segment inputs per block); "layer": one segment per block (holds a whole block's).
        self.checkpoint_granularity = "sublayer"

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames for input ``lengths`` (int64 [B])."""
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: feats float [B, T, F]; lengths int64 [B] (valid frames).

        Returns: log-probabilities float [B, T', V] with ``T' = ceil(T / stack)``, and output lengths int64 [B].
        """
        b, t, f = feats.shape
        pad = (-t) % self.stack
        if pad:
            feats = F.pad(feats, (0, 0, 0, pad))
        x = feats.reshape(b, (t + pad) // self.stack, f * self.stack)
        out_lengths = self.output_lengths(lengths)
        x = self.frontend(x)
        steps = torch.arange(x.shape[1], device=x.device)
        padding_mask = steps[None, :] >= out_lengths[:, None]  # True = padded frame (torchaudio convention)
        x = x.transpose(0, 1)  # torchaudio ConformerLayer works on [T, B, D]
        use_ckpt = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.conformer_layers:
            if use_ckpt and self.checkpoint_granularity == "sublayer":
                x = _sublayer_checkpointed(layer, x, padding_mask)
            elif use_ckpt:
                x = checkpoint(layer, x, padding_mask, use_reentrant=False)
            else:
                x = layer(x, padding_mask)
        x = x.transpose(0, 1)
        return F.log_softmax(self.head(x), dim=-1), out_lengths


def _half_ffn(ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ffn(x) * 0.5 + x


def _attention_block(layer: nn.Module, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    y = layer.self_attn_layer_norm(x)
    y, _ = layer.self_attn(query=y, key=y, value=y, key_padding_mask=padding_mask, need_weights=False)
    return layer.self_attn_dropout(y) + x


def _last_half_ffn(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.final_layer_norm(layer.ffn2(x) * 0.5 + x)


def _sublayer_checkpointed(layer: nn.Module, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """torchaudio ``ConformerLayer.forward`` (torchaudio 2.11, same operations in the same order) with one
    non-reentrant checkpoint per sub-module: FFN/2, [conv], MHSA, [conv], FFN/2 + LayerNorm. Dropout masks are the
    same as without checkpointing (each segment replays its RNG state). x: float [T, B, D]; returns [T, B, D]."""
    x = checkpoint(_half_ffn, layer.ffn1, x, use_reentrant=False)
    if layer.convolution_first:
        x = checkpoint(layer._apply_convolution, x, use_reentrant=False)
    x = checkpoint(_attention_block, layer, x, padding_mask, use_reentrant=False)
    if not layer.convolution_first:
        x = checkpoint(layer._apply_convolution, x, use_reentrant=False)
    return checkpoint(_last_half_ffn, layer, x, use_reentrant=False)


def is_encoder_matrix(name: str, module: nn.Module) -> bool:
    """Quantization filter of spec §2.1: encoder Linear/Conv1d/MultiheadAttention matrices; the head stays float."""
    if not (name == "frontend" or name.startswith("encoder.")):
        return False
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.MultiheadAttention))
