"""A third-party fedaqt plugin: a workload, a strategy and a client algorithm, registered in this package's
pyproject.toml."""
import numpy as np
import torch
from flwr.serverapp.strategy import FedAdagrad
from pydantic import Field
from torch.nn import Linear, ReLU, Sequential
from torch.nn.functional import cross_entropy

from fedaqt.algorithms.fedavg import FedAvg
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

    def partition_size(self, client_id):  # optional: a fixed partition per client enables -o local_epochs=E
        return 64

    def client_epoch_batches(self, client_id, round_num, epoch, batch_size):  # the partition once, shuffled
        x, y = self.data(10**5 + client_id, n=64)
        order = torch.from_numpy(np.random.default_rng([self.config.seed, client_id, round_num, epoch]).permutation(64))
        return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, 64, batch_size)]

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


class LocalProx(FedAvg):
    """example: FedProx's proximal local step as a client algorithm, w -= lr (g + prox_mu (w - w_0))"""

    name = "localprox"
    description = "example: FedAvg local SGD with its own proximal term prox_mu (w - w_0); reports prox_sq_dist"
    upload = "delta"  # what the server aggregates: final - received weights

    class Options(FedAvg.Options):  # FedAvg's options (local_epochs, momentum, ...) plus one
        prox_mu: float = Field(0.1, ge=0, description="proximal coefficient of the local step")

    def proximal_mu(self, ctx):  # the strategy's mu (FedProx) plus this algorithm's own
        return ctx.proximal_mu + self.options.prox_mu

    def needs_initial_weights(self, ctx):  # step_gradient reads w0
        return True

    def local_round(self, ctx, batches):
        self.sq_dist, self.steps = 0.0, len(batches)
        return super().local_round(ctx, batches)

    def step_gradient(self, ctx, key, w, g, w0):  # per tensor and step; w0 = the received value
        self.sq_dist += float(((w - w0) ** 2).sum())
        return super().step_gradient(ctx, key, w, g, w0)

    def round_metrics(self, ctx):  # a clients.csv column: mean over steps of ||w - w_0||^2
        return {"prox_sq_dist": self.sq_dist / self.steps}
