"""A third-party fedaqt plugin: a workload and a strategy, registered in this package's pyproject.toml."""
import numpy as np
import torch
from flwr.serverapp.strategy import FedAdagrad
from torch.nn import Linear, ReLU, Sequential
from torch.nn.functional import cross_entropy

from fedaqt.strategies.quantized import QuantizedMixin
from fedaqt.strategies.registry import base_kwargs
from fedaqt.workloads.base import Workload


class BlobsWorkload(Workload):
    description = "example: MLP on 3 Gaussian blobs; its first layer trains natively quantized"
    eval_columns = ("eval_loss", "eval_accuracy")

    def data(self, *key, n):  # deterministic in (seed, key)
        rng = np.random.default_rng([self.config.seed, *key])
        y = rng.integers(0, 3, n)
        return torch.tensor(rng.normal(size=(n, 8)) + 2 * np.eye(8)[y], dtype=torch.float32), torch.tensor(y)

    def build_model(self):  # the float model, initialized from the seed
        torch.manual_seed(self.config.seed)
        return Sequential(Linear(8, 32), ReLU(), Linear(32, 3))

    def quantize_filter(self, name, module):  # layers that hold int8/int4 codes + scales on clients
        return name == "0"

    def num_partitions(self):
        return self.config.num_clients

    def client_batches(self, client_id, round_num, num_batches, batch_size):
        return [self.data(client_id, round_num, i, n=batch_size) for i in range(num_batches)]

    def loss(self, model, batch):  # (mean loss, number of examples)
        return cross_entropy(model(batch[0]), batch[1]), len(batch[1])

    def evaluate(self, model, round_num):  # server side, on the float global model
        x, y = self.data(10**6, n=512)
        with torch.no_grad():
            out = model(x)
        return {"eval_loss": float(cross_entropy(out, y)), "eval_accuracy": float((out.argmax(1) == y).float().mean())}


class QuantizedFedAdagrad(QuantizedMixin, FedAdagrad):
    """example: Flower's FedAdagrad server optimizer over fedaqt's quantized broadcast (eta = --server-lr)"""

    @classmethod
    def from_config(cls, cfg, spec):  # optional; the default is cls(**base_kwargs(cfg, spec))
        return cls(**base_kwargs(cfg, spec), eta=cfg.server_lr, eta_l=cfg.lr)
