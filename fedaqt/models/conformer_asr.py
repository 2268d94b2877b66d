"""Conformer CTC acoustic model built on ``torchaudio.models.Conformer`` (spec §2.1, §2.5).

Layout (the names matter: the quantizer selects layers by qualified name):

* ``frontend``: frame stacking (``stack`` log-Mel frames -> one, i.e. ``stack``x subsampling) + ``nn.Linear`` to
  ``d_model``. Encoder matrix: quantized.
* ``encoder``: ``torchaudio.models.Conformer`` with GroupNorm in the conv module (no BatchNorm running statistics,
  so a FedSGD client step is a pure function of the broadcast weights). Its Linear/Conv1d/MultiheadAttention
  matrices are quantized.
* ``head``: ``nn.Linear(d_model, vocab)`` CTC head. Stays float (the "decoder" of spec §2.1).

Gradient checkpointing (spec §2.2 step 2) wraps every Conformer block with
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; set ``model.checkpointing``.
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
            if use_ckpt:
                x = checkpoint(layer, x, padding_mask, use_reentrant=False)
            else:
                x = layer(x, padding_mask)
        x = x.transpose(0, 1)
        return F.log_softmax(self.head(x), dim=-1), out_lengths


def is_encoder_matrix(name: str, module: nn.Module) -> bool:
    """Quantization filter of spec §2.1: encoder Linear/Conv1d/MultiheadAttention matrices; the head stays float."""
    if not (name == "frontend" or name.startswith("encoder.")):
        return False
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.MultiheadAttention))
