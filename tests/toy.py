"""A tiny float64 workload for fast, exact tests: 2 quantized Linear layers + 1 float "decoder" Linear.

Client k has a fixed batch of ``BATCH_SIZES[k]`` examples (spec §2.6: batch sizes 2, 3 and 5).
"""

from __future__ import annotations

import torch
from torch import nn

from fedaqt.workloads.base import Workload

BATCH_SIZES = (2, 3, 5, 4, 6, 2)


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Linear(6, 8)
        self.enc2 = nn.Linear(8, 5)
        self.dec = nn.Linear(5, 3)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc2(torch.tanh(self.enc1(x)))))


class ToyWorkload(Workload):
    name = "toy"
    description = "test workload"
    eval_columns = ("eval_loss",)

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return ToyNet().double()

    def quantize_filter(self, name, module):
        return name.startswith("enc")

    def num_partitions(self):
        return len(BATCH_SIZES)

    def data(self, client_id, round_num=1):
        g = torch.Generator().manual_seed(1000 * client_id + round_num)
        n = BATCH_SIZES[client_id]
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        return x, y

    def client_batches(self, client_id, round_num, num_batches, batch_size):
        return [self.data(client_id, round_num + 100 * i) for i in range(num_batches)]

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), int(x.shape[0])

    def evaluate(self, model, round_num):
        with torch.no_grad():
            losses = [float(self.loss(model, self.data(c, 0))[0]) for c in range(len(BATCH_SIZES))]
        return {"eval_loss": sum(losses) / len(losses)}
