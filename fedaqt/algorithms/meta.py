"""Full-network meta-learning inner loops (spec §5.3-5.4): MAML (second order), FOMAML, Reptile and consensus
(weight-clustering) Reptile, as functional math (``torch.func``) and as client algorithms of the registry.

Federated reading: the clients of a round are the meta-batch. A client draws one task (an N-way episode over its
own background classes, labels shuffled) per round.

* ``fomaml`` (every bit-width): ``inner_steps`` local SGD steps on the support set on the native quantized model
  (exactly FedAvg's step and re-quantization), then the query gradient at the adapted weights is uploaded as a
  gradient; with ``--strategy fedsgd`` the server applies ``theta <- theta - server_lr * mean(g)``, MAML's outer step.
* ``maml`` (second order, ``--bits 32`` only): the meta-gradient through the inner steps (Hessian-vector products
  via ``torch.func``). At 8/4 bits a client holds codes, not differentiable float weights, and the inner step's
  re-quantization (round) has zero derivative, so second order is refused there (ConfigError) -- use ``fomaml``.
* ``reptile`` (every bit-width): ``inner_steps`` SGD steps on minibatches of one task, upload ``theta~ - theta``;
  with ``--strategy fedavgm --server-lr EPS --server-momentum 0`` the server does ``theta + EPS mean(theta~ -
  theta)``: batched Reptile is FedAvg with server learning rate EPS (tested against a numpy reference).
* ``consensus_reptile`` (``--bits 32``): ``tasks_per_client`` tasks in lock-step with the filter-normalized pull
  toward their mean (Algorithm 4), upload ``mean_p(theta~_p - theta)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from pydantic import Field

from fedaqt.algorithms.base import ClientAlgorithm, LocalContext, LocalResult
from fedaqt.algorithms.fedavg import FedAvg, FedAvgOptions
from fedaqt.algorithms.fedsgd import FedSGD
from fedaqt.config import ConfigError, RunConfig
from fedaqt.options import BaseOptions

Params = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ functional math
def adapt(loss_s: Callable[[Params], torch.Tensor], params: Params, inner_lr: float, steps: int) -> dict:
    """``steps`` SGD steps ``theta'_{s+1} = theta'_s - a grad L_S(theta'_s)`` (differentiable in ``params`` when
    called inside ``torch.func.grad``)."""
    from torch.func import grad

    p = dict(params)
    for _ in range(steps):
        g = grad(loss_s)(p)
        p = {k: p[k] - inner_lr * g[k] for k in p}
    return p


def maml_meta_gradient(loss_s: Callable[[Params], torch.Tensor], loss_q: Callable[[Params], torch.Tensor],
                       params: Params, inner_lr: float, steps: int = 1, first_order: bool = False) -> dict:
    """MAML's meta-gradient ``d L_Q(theta'_S) / d theta`` (second order: through all inner steps), or FOMAML's
    ``grad L_Q`` at ``theta'_S`` with the inner gradients treated as constants (spec §5.3).

    Args:
        loss_s, loss_q: support / query loss of a parameter dict (0-d tensors), e.g. via
            ``torch.func.functional_call``.
        params: the meta-parameters theta (any float dtype).
        inner_lr: a; steps: S >= 1.

    Returns:
        ``{name: gradient}`` shaped like ``params``.
    """
    from torch.func import grad

    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if first_order:
        adapted = adapt(loss_s, {k: v.detach() for k, v in params.items()}, inner_lr, steps)
        return grad(loss_q)({k: v.detach() for k, v in adapted.items()})
    return grad(lambda p: loss_q(adapt(loss_s, p, inner_lr, steps)))(dict(params))


def _outer(params: Params, thetas: list[dict], eps: float) -> dict:
    m = len(thetas)
    return {k: params[k] + eps * (sum(t[k] - params[k] for t in thetas) / m) for k in params}


def reptile_update(params: Params, task_losses: list[Callable[[Params, int], torch.Tensor]], inner_lr: float,
                   inner_steps: int, eps: float) -> dict:
    """Batched Reptile: per task p, ``inner_steps`` SGD steps from theta on ``task_losses[p](theta, step)``, then
    ``theta + eps * mean_p(theta~_p - theta)`` (spec §5.3)."""
    from torch.func import grad

    thetas = []
    for loss in task_losses:
        p = dict(params)
        for s in range(inner_steps):
            g = grad(lambda q, s=s: loss(q, s))(p)
            p = {k: p[k] - inner_lr * g[k] for k in p}
        thetas.append(p)
    return _outer(params, thetas, eps)


def filter_normalized_dist2(a: Params, ref: Params, eps: float = 1e-12) -> torch.Tensor:
    """``d(a, ref)^2 = sum_f ||a_f - ref_f||^2 / ||ref_f||^2`` over output filters (dim 0) of every >= 2-D tensor;
    1-D/0-D tensors count as one filter each. The normalizer is detached (spec §5.4 [CHOICE])."""
    total = 0.0
    for k in a:
        d = a[k] - ref[k]
        r = ref[k].detach()
        if d.ndim >= 2:
            total = total + (d.pow(2).flatten(1).sum(1) / (r.pow(2).flatten(1).sum(1) + eps)).sum()
        else:
            total = total + d.pow(2).sum() / (r.pow(2).sum() + eps)
    return total


def consensus_reptile_update(params: Params, task_losses: list[Callable[[Params, int], torch.Tensor]],
                             inner_lr: float, inner_steps: int, eps: float, beta_eff: float) -> dict:
    """Consensus (weight-clustering) Reptile, Algorithm 4: the m tasks' inner loops run in lock-step; at each step
    task i descends ``L_i(theta~_i) + lam d(theta~_i, theta_bar)^2`` with theta_bar the current mean (recomputed,
    depending on theta~_i), ``lam = beta_eff / (2 (1 - 1/m))``; then the Reptile outer step. ``beta_eff = 0`` runs
    exactly the operations of :func:`reptile_update` (bitwise identical)."""
    from torch.func import grad

    m = len(task_losses)
    lam = beta_eff / (2 * (1 - 1 / m)) if m > 1 else 0.0
    thetas = [dict(params) for _ in range(m)]
    for s in range(inner_steps):
        grads = []
        for i, loss in enumerate(task_losses):
            if lam == 0.0:
                grads.append(grad(lambda q, s=s, loss=loss: loss(q, s))(thetas[i]))
                continue
            others = [{k: v.detach() for k, v in t.items()} for t in thetas]

            def total(q, i=i, s=s, loss=loss, others=others):
                bar = {k: (sum(others[j][k] for j in range(m) if j != i) + q[k]) / m for k in q}
                return loss(q, s) + lam * filter_normalized_dist2(q, bar)

            grads.append(grad(total)(thetas[i]))
        thetas = [{k: t[k] - inner_lr * g[k] for k in t} for t, g in zip(thetas, grads)]
    return _outer(params, thetas, eps)


def model_losses(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]):
    """``make(x, y) -> (params -> loss)`` for ``torch.func.functional_call(model, (params, buffers), x)``.

    BatchNorm layers run on batch statistics without updating their running statistics inside the call
    (``track_running_stats`` is off for its duration): a ``torch.func`` transform may not mutate captured buffers.
    So the second-order / consensus paths leave BatchNorm's running statistics as received."""
    from torch.func import functional_call

    buffers = dict(model.named_buffers())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def call(p: Params, x: torch.Tensor) -> torch.Tensor:
        saved = [m.track_running_stats for m in norms]
        for m in norms:
            m.track_running_stats = False
        try:
            return functional_call(model, (dict(p), buffers), (x,))
        finally:
            for m, t in zip(norms, saved):
                m.track_running_stats = t

    def make(x: torch.Tensor, y: torch.Tensor) -> Callable[[Params], torch.Tensor]:
        return lambda p: loss_fn(call(p, x), y)

    return make


# ------------------------------------------------------------------------------------------------ client algorithms
class _TaskMixin:
    """Tasks from the workload: ``workload.client_task(client_id, round_num, index) -> (x_s, y_s, x_q, y_q)``
    (float inputs, labels in [0, N)) and ``workload.task_examples()`` (images of one task)."""

    @classmethod
    def max_examples(cls, config: RunConfig, workload: Any, client_id: int) -> int:
        cls._check_workload(workload, cls.name)
        return int(workload.task_examples()) * max(1, cls.tasks(config))

    @classmethod
    def tasks(cls, config: RunConfig) -> int:
        return 1

    @staticmethod
    def _check_workload(workload: Any, name: str) -> None:
        if not hasattr(workload, "client_task"):
            raise ValueError(f"algorithm {name!r} needs a few-shot workload (--workload fewshot); "
                             f"{type(workload).__name__} has no client_task")


class MetaOptions(FedAvgOptions):
    """``-o`` options of the MAML-family algorithms (plus FedAvg's step options for the inner SGD)."""

    inner_steps: int = Field(5, ge=1, le=100, description="inner SGD steps per task (lr = --lr)")


class FOMAML(_TaskMixin, FedAvg):
    """First-order MAML on the native quantized model (any ``--bits``); uploads the query gradient."""

    name = "fomaml"
    description = "first-order MAML: inner SGD on the support set (quantized), uploads the query gradient"
    upload = "gradient"
    Options = MetaOptions

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        opts = cls.parse_options(config)
        if opts.local_epochs:
            raise ConfigError(f"options.local_epochs={opts.local_epochs}: fomaml's inner loop is inner_steps")

    def batches(self, workload: Any, client_id: int, round_num: int) -> list[Any]:
        self._check_workload(workload, self.name)
        xs, ys, xq, yq = workload.client_task(client_id, round_num, 0)
        return [(xs, ys)] * self.options.inner_steps + [(xq, yq)]

    def local_round(self, ctx: LocalContext, batches: list[Any]) -> LocalResult:
        inner = dataclasses.replace(ctx, upload=type(ctx.upload)(32), final_codes=False, handles=[], losses=[])
        res = FedAvg.local_round(self, inner, batches[:-1])  # the adapted weights, in place
        for h in inner.handles:
            h.remove()
        del inner
        ctx.probe.next_step()  # a further forward of the model: the memory profiler needs the step boundary
        out = FedSGD.local_round(self, ctx, batches[-1:])  # the query gradient at theta'
        # weight: the task's images (support once + query)
        return LocalResult(num_examples=len(batches[0][1]) + out.num_examples, changed_fraction=res.changed_fraction)


class MAML(_TaskMixin, ClientAlgorithm):
    """Second-order MAML (``--bits 32``): uploads the exact meta-gradient through the inner steps."""

    name = "maml"
    description = "second-order MAML via torch.func (--bits 32 only); uploads the meta-gradient"
    upload = "gradient"

    class Options(BaseOptions):
        inner_steps: int = Field(5, ge=1, le=100, description="inner SGD steps per task (lr = --lr)")

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        cls.parse_options(config)
        if config.bits != 32:
            raise ConfigError(f"bits={config.bits}: second-order MAML needs --bits 32 (quantized clients hold codes, "
                              "and re-quantization has zero derivative); use --algorithm fomaml at 8/4 bits")

    def batches(self, workload: Any, client_id: int, round_num: int) -> list[Any]:
        self._check_workload(workload, self.name)
        return [workload.client_task(client_id, round_num, 0)]

    def local_round(self, ctx: LocalContext, batches: list[Any]) -> LocalResult:
        import torch.nn.functional as F

        xs, ys, xq, yq = batches[0]
        make = model_losses(ctx.model, F.cross_entropy)
        params = {k: p for k, p in ctx.params.items()}
        g = maml_meta_gradient(make(xs, ys), make(xq, yq), params, ctx.lr, self.options.inner_steps)
        with torch.no_grad():
            ctx.losses.append(float(make(xq, yq)(adapt(make(xs, ys), {k: v.detach() for k, v in params.items()},
                                                      ctx.lr, self.options.inner_steps))))
        for key, p in ctx.model.named_parameters():
            if key in g:
                ctx.upload.add(key, g[key].detach())
            else:
                ctx.upload.add_zeros(key, tuple(p.shape))
        return LocalResult(num_examples=int(len(ys) + len(yq)))


class ReptileOptions(MetaOptions):
    inner_batch: int = Field(10, ge=1, description="images per inner minibatch (drawn from the task's support "
                                                   "+ query images, cycling)")


def _task_minibatches(task: tuple, steps: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs, ys, xq, yq = task
    x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(-(-steps * batch // len(y)))])
    return [(x[order[i * batch:(i + 1) * batch]], y[order[i * batch:(i + 1) * batch]]) for i in range(steps)]


class Reptile(_TaskMixin, FedAvg):
    """Reptile on the native quantized model (any ``--bits``): ``inner_steps`` SGD steps on minibatches of one
    task, uploads ``theta~ - theta`` (FedAvg's step); the server's learning rate is Reptile's epsilon."""

    name = "reptile"
    description = "Reptile: inner SGD on one task's minibatches (quantized), uploads the delta (server lr = epsilon)"
    upload = "delta"
    Options = ReptileOptions

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        opts = cls.parse_options(config)
        if opts.local_epochs:
            raise ConfigError(f"options.local_epochs={opts.local_epochs}: reptile's inner loop is inner_steps")

    @classmethod
    def max_examples(cls, config: RunConfig, workload: Any, client_id: int) -> int:
        cls._check_workload(workload, cls.name)
        o = cls.parse_options(config)
        return int(o.inner_steps * o.inner_batch)

    def batches(self, workload: Any, client_id: int, round_num: int) -> list[Any]:
        self._check_workload(workload, self.name)
        task = workload.client_task(client_id, round_num, 0)
        seed = (self.config.seed * 1000003 + client_id * 7919 + round_num) & 0x7FFFFFFF
        return _task_minibatches(task, self.options.inner_steps, self.options.inner_batch, seed)


class ConsensusReptile(_TaskMixin, ClientAlgorithm):
    """Consensus Reptile within a client's meta-batch (``--bits 32``): Algorithm 4 over ``tasks_per_client``
    tasks, upload ``mean_p(theta~_p - theta)``."""

    name = "consensus_reptile"
    description = "consensus (weight-clustering) Reptile over a client's tasks (--bits 32); uploads the mean delta"
    upload = "delta"

    class Options(BaseOptions):
        inner_steps: int = Field(5, ge=1, le=100, description="inner SGD steps per task (lr = --lr)")
        inner_batch: int = Field(10, ge=1, description="images per inner minibatch")
        tasks_per_client: int = Field(4, ge=1, le=32, description="tasks m in the client's meta-batch")
        beta_eff: float = Field(5e-5, ge=0, description="consensus coefficient beta_eff = lam 2(1-1/m) (0 = Reptile)")

    @classmethod
    def max_examples(cls, config: RunConfig, workload: Any, client_id: int) -> int:
        cls._check_workload(workload, cls.name)
        o = cls.parse_options(config)
        return int(o.tasks_per_client * o.inner_steps * o.inner_batch)

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        cls.parse_options(config)
        if config.bits != 32:
            raise ConfigError(f"bits={config.bits}: consensus_reptile keeps m float copies of the model and needs "
                              "--bits 32; use --algorithm reptile at 8/4 bits")

    def batches(self, workload: Any, client_id: int, round_num: int) -> list[Any]:
        self._check_workload(workload, self.name)
        o = self.options
        seed = (self.config.seed * 1000003 + client_id * 7919 + round_num) & 0x7FFFFFFF
        return [_task_minibatches(workload.client_task(client_id, round_num, t), o.inner_steps, o.inner_batch,
                                  seed + t) for t in range(o.tasks_per_client)]

    def local_round(self, ctx: LocalContext, batches: list[Any]) -> LocalResult:
        import torch.nn.functional as F

        make = model_losses(ctx.model, F.cross_entropy)
        losses = [lambda p, s, mb=mb: make(*mb[s])(p) for mb in batches]
        params = {k: p.detach() for k, p in ctx.params.items()}
        new = consensus_reptile_update(params, losses, ctx.lr, self.options.inner_steps, 1.0, self.options.beta_eff)
        with torch.no_grad():
            ctx.losses.append(float(sum(make(*mb[0])(params) for mb in batches) / len(batches)))
        for key, p in ctx.model.named_parameters():
            if key in new:
                ctx.upload.add(key, (new[key] - params[key]).detach())
            else:
                ctx.upload.add_zeros(key, tuple(p.shape))
        n = sum(len(y) for mb in batches for _, y in mb)
        return LocalResult(num_examples=int(n))
