"""Few-shot networks (spec §5): Conv-4 and a small ResNet-12 backbone, the frozen-backbone heads (ProtoNet, R2-D2,
MetaOptNet-SVM), the R_FC / R_HV regularizers (also metrics) and linear CKA.

Backbones are plain ``nn.Conv2d``/``BatchNorm2d`` stacks, so :func:`fedaqt.quant.convert.convert_to_quantized`
turns every conv into a native int8/int4 layer on clients. Heads take features ``[n, D]`` (one task); a leading
task dimension ``T`` is handled by the caller looping or by broadcasting where noted.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- backbones
def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]


class Conv4(nn.Module):
    """Conv-4 (Vinyals et al.; MAML's 32 filters, ProtoNet's 64): 4 x [conv3x3, BN, ReLU, maxpool2].

    Input float32 ``[B, C, H, W]``; output features ``[B, width * (H//16) * (W//16)]`` (28x28 -> ``width``).
    """

    def __init__(self, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(4):
            layers += _conv_bn(c, width) + [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1, self.b1 = _conv_bn(cin, cout)
        self.c2, self.b2 = _conv_bn(cout, cout)
        self.c3, self.b3 = _conv_bn(cout, cout)
        self.sc, self.sb = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        h = F.leaky_relu(self.b2(self.c2(h)), 0.1)
        h = self.b3(self.c3(h))
        return self.pool(F.leaky_relu(h + self.sb(self.sc(x)), 0.1))


class ResNet12(nn.Module):
    """ResNet-12 (MetaOptNet/TADAM): 4 residual blocks of 3 conv3x3 + a 1x1 shortcut, LeakyReLU 0.1, maxpool 2.

    ``width`` w gives channels (w, 2w, 4w, 8w); MetaOptNet's is w = 64 (64-160-320-640 there); the default here
    (w = 16) is small for 28x28 inputs. Output ``[B, 8w]`` after global average pooling.
    """

    def __init__(self, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        ch = [in_channels, width, 2 * width, 4 * width, 8 * width]
        self.blocks = nn.Sequential(*[_ResBlock(ch[i], ch[i + 1]) for i in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean((2, 3))


BACKBONES = {"conv4": Conv4, "resnet12": ResNet12}


def build_backbone(name: str, in_channels: int = 1, width: int = 0) -> nn.Module:
    """``conv4`` (default width 64) or ``resnet12`` (default width 16).

    Raises:
        ValueError: unknown name.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not one of {sorted(BACKBONES)}")
    kw = {"width": width} if width else {}
    return BACKBONES[name](in_channels, **kw)


# ----------------------------------------------------------------------------------------------- heads
def _onehot(y: torch.Tensor, n_way: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y, n_way).to(dtype)


def prototypes(phi_s: torch.Tensor, y_s: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means ``p_n = mean_{i: y_i = n} phi_s,i``: ``[N, D]`` from ``phi_s [n, D]``, ``y_s [n]`` in [0, N)."""
    oh = _onehot(y_s, n_way, phi_s.dtype)
    return (oh.t() @ phi_s) / oh.sum(0).clamp_min(1).unsqueeze(1)


def protonet_logits(phi_s: torch.Tensor, y_s: torch.Tensor, phi_q: torch.Tensor, n_way: int,
                    scale: Optional[torch.Tensor] = None, normalize_by_dim: bool = False) -> torch.Tensor:
    """ProtoNet logits ``l_jn = -scale * ||phi_q,j - p_n||^2`` (``/ D`` with ``normalize_by_dim``): ``[n_q, N]``."""
    p = prototypes(phi_s, y_s, n_way)
    d2 = (phi_q.unsqueeze(1) - p.unsqueeze(0)).pow(2).sum(-1)
    if normalize_by_dim:
        d2 = d2 / phi_q.shape[-1]
    return -d2 if scale is None else -scale * d2


def ridge_weights(x: torch.Tensor, y_onehot: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """R2-D2 ridge solution ``W = (X^T X + lam I_D)^-1 X^T Y`` ``[D, N]``, through the smaller system: the
    Woodbury form ``X^T (X X^T + lam I_n)^-1 Y`` when ``n < D`` (``torch.linalg.solve``, no explicit inverse)."""
    n, d = x.shape
    if n < d:
        a = x @ x.t() + lam * torch.eye(n, dtype=x.dtype, device=x.device)
        return x.t() @ torch.linalg.solve(a, y_onehot)
    a = x.t() @ x + lam * torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(a, x.t() @ y_onehot)


def r2d2_logits(phi_s: torch.Tensor, y_s: torch.Tensor, phi_q: torch.Tensor, n_way: int, lam: float | torch.Tensor,
                alpha: torch.Tensor | float = 1.0, beta: torch.Tensor | float = 0.0) -> torch.Tensor:
    """R2-D2 logits ``alpha * phi_q W + beta`` with :func:`ridge_weights` (spec §5.2): ``[n_q, N]``."""
    w = ridge_weights(phi_s, _onehot(y_s, n_way, phi_s.dtype), lam)
    return alpha * (phi_q @ w) + beta


def svm_qp(phi_s: torch.Tensor, y_s: torch.Tensor, n_way: int, c_reg: float = 0.1, ridge: float = 1.0):
    """The Crammer-Singer dual QP of MetaOptNet-SVM in qpth's form ``min 1/2 a^T Q a + p^T a, G a <= h, A a = b``
    over ``a = vec(alpha) [n*N]`` (row-major ``alpha [n, N]``): ``Q = kron(K, I_N) + ridge I`` (``K = phi phi^T``;
    MetaOptNet adds ``ridge = 1``), ``p = -vec(onehot)``, ``G = I``, ``h = C vec(onehot)``, ``A = kron(I_n, 1_N^T)``,
    ``b = 0``. Returns ``(Q, p, G, h, A, b)``."""
    n = phi_s.shape[0]
    dt = phi_s.dtype
    k = phi_s @ phi_s.t()
    q = torch.kron(k, torch.eye(n_way, dtype=dt)) + ridge * torch.eye(n * n_way, dtype=dt)
    oh = _onehot(y_s, n_way, dt).reshape(-1)
    g = torch.eye(n * n_way, dtype=dt)
    a = torch.kron(torch.eye(n, dtype=dt), torch.ones(1, n_way, dtype=dt))
    return q, -oh, g, c_reg * oh, a, torch.zeros(n, dtype=dt)


def svm_dual(phi_s: torch.Tensor, y_s: torch.Tensor, n_way: int, c_reg: float = 0.1, ridge: float = 1.0,
             max_iter: int = 15) -> torch.Tensor:
    """``alpha [n, N]`` solving :func:`svm_qp` with qpth's differentiable interior-point solver (gradients reach
    ``phi_s`` by implicit differentiation of the KKT conditions, as MetaOptNet)."""
    from qpth.qp import QPFunction, QPSolvers

    q, p, g, h, a, b = svm_qp(phi_s, y_s, n_way, c_reg, ridge)
    sol = QPFunction(verbose=-1, maxIter=max_iter, solver=QPSolvers.PDIPM_BATCHED)(
        q.unsqueeze(0), p.detach().unsqueeze(0), g.detach().unsqueeze(0), h.detach().unsqueeze(0),
        a.detach().unsqueeze(0), b.detach().unsqueeze(0))
    return sol.reshape(phi_s.shape[0], n_way)


def svm_logits(phi_s: torch.Tensor, y_s: torch.Tensor, phi_q: torch.Tensor, n_way: int, c_reg: float = 0.1,
               scale: torch.Tensor | float = 1.0, ridge: float = 1.0, max_iter: int = 15) -> torch.Tensor:
    """MetaOptNet-SVM logits ``scale * (w_m . phi_q,j)`` with ``w_m = sum_i alpha_im phi_s,i``: ``[n_q, N]``."""
    alpha = svm_dual(phi_s, y_s, n_way, c_reg, ridge, max_iter)
    w = alpha.t().to(phi_s.dtype) @ phi_s  # [N, D]
    return scale * (phi_q @ w.t())


def adapt_classifier(weight: torch.Tensor, bias: torch.Tensor, fs: torch.Tensor, ys: torch.Tensor, n_way: int,
                     steps: int, lr: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adapt a linear classifier on frozen support features of E episodes at once: ``steps`` full-batch gradient
    steps on the mean cross-entropy of each episode's support set, from the (meta-learned) initialization
    ``(weight, bias)`` (MAML-family evaluation on features, spec §5.3).

    The features are centred on each episode's support mean ``mu`` first and the bias starts at ``bias + weight mu``,
    an exact reparametrization (the initial logits are unchanged; the bias absorbs the shift). It matters because
    ReLU/BatchNorm features share a large common component (Conv-4 on the glyphs: ``||mean f||^2 ~ 90`` of
    ``E||f||^2 ~ 93``): uncentred, the loss curvature along it is ~45 and a step of 0.5 oscillates instead of
    fitting the support set (the old evaluation fit 57% of the 5-shot support points in 50 steps).

    ``lr = 0`` (default) takes per episode the step ``1 / L`` with ``L = 1/2 lambda_max(mean_i x_i x_i^T)``,
    ``x_i = [f_i - mu, 1]``: Böhning's bound ``1/2`` on the softmax Hessian makes ``L`` a Lipschitz constant of the
    gradient, so every step decreases the support loss (convex, L-smooth). ``lr > 0``: that fixed step for all.

    Args:
        weight, bias: ``[N, D]``, ``[N]`` initialization (not modified).
        fs: support features ``[E, n_s, D]`` (any float dtype; the computation runs in it).
        ys: support labels ``[n_s]`` in ``[0, N)``, the same for every episode.
        n_way: N; steps: >= 0; lr: >= 0.

    Returns:
        ``(w [E, N, D], b [E, N], mu [E, 1, D])``: score queries as ``(fq - mu) @ w^T + b``.

    Raises:
        ValueError: ``steps < 0``, ``lr < 0`` or shape mismatches (values named).
    """
    if steps < 0 or lr < 0:
        raise ValueError(f"adapt_classifier: steps={steps} and lr={lr} must be >= 0")
    if fs.dim() != 3 or fs.shape[1] != ys.shape[0] or tuple(weight.shape) != (n_way, fs.shape[2]):
        raise ValueError(f"adapt_classifier: fs {tuple(fs.shape)}, ys {tuple(ys.shape)}, weight "
                         f"{tuple(weight.shape)} do not match [E, n_s, D], [n_s], [N={n_way}, D]")
    e, n_s, _ = fs.shape
    mu = fs.mean(1, keepdim=True)
    x = fs - mu
    w = weight.detach().to(fs.dtype).unsqueeze(0).repeat(e, 1, 1)
    b = bias.detach().to(fs.dtype).unsqueeze(0) + (mu @ w.transpose(1, 2)).squeeze(1)
    if lr > 0:
        step = torch.full((e, 1), float(lr), dtype=fs.dtype)
    else:
        xa = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        lmax = torch.linalg.eigvalsh(xa.transpose(1, 2) @ xa / n_s)[:, -1]
        step = (1.0 / (0.5 * lmax)).unsqueeze(1)
    oh = _onehot(ys, n_way, fs.dtype).unsqueeze(0)
    for _ in range(steps):
        r = (torch.softmax(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)), -1) - oh) / n_s  # dL/dlogits
        w = w - step.unsqueeze(2) * (r.transpose(1, 2) @ x)
        b = b - step * r.sum(1)
    return w, b, mu


class EpisodeHead(nn.Module):
    """The learnable scalars of a head: ProtoNet ``scale`` (init 1), R2-D2 ``alpha`` (1) / ``beta`` (0) /
    ``log_lambda`` (log 50, learnable with ``learn_lambda``), SVM ``scale`` (1). All float ``[1]`` tensors (kept so
    for checkpoint compatibility; 0-d parameters also work since the normalized reply keeps their shape), never
    quantized."""

    def __init__(self, method: str, lam: float = 50.0, learn_lambda: bool = False, c_reg: float = 0.1,
                 svm_ridge: float = 1.0, svm_iters: int = 15, normalize_by_dim: bool = True) -> None:
        super().__init__()
        if method not in ("protonet", "r2d2", "svm"):
            raise ValueError(f"head method={method!r} is not one of protonet, r2d2, svm")
        self.method = method
        self.scale = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1)) if method == "r2d2" else None
        lg = torch.log(torch.tensor([float(lam)]))
        self.log_lambda = nn.Parameter(lg) if learn_lambda else None
        self.register_buffer("_log_lambda_fixed", lg, persistent=False)
        self.c_reg, self.svm_ridge, self.svm_iters, self.normalize_by_dim = c_reg, svm_ridge, svm_iters, normalize_by_dim

    def forward(self, phi_s: torch.Tensor, y_s: torch.Tensor, phi_q: torch.Tensor, n_way: int) -> torch.Tensor:
        if self.method == "protonet":
            return protonet_logits(phi_s, y_s, phi_q, n_way, self.scale, self.normalize_by_dim)
        if self.method == "r2d2":
            lam = torch.exp(self.log_lambda if self.log_lambda is not None else self._log_lambda_fixed)
            return r2d2_logits(phi_s, y_s, phi_q, n_way, lam, self.scale, self.beta)
        return svm_logits(phi_s, y_s, phi_q, n_way, self.c_reg, self.scale, self.svm_ridge, self.svm_iters)


class FewShotNet(nn.Module):
    """Backbone + head: ``head`` is an :class:`EpisodeHead` (protonet/r2d2/svm) or none; ``classifier`` a float
    ``nn.Linear(D, n_out)`` for MAML-family methods (``n_out`` = N) and classical training (all background
    classes), else None."""

    def __init__(self, backbone: nn.Module, feat_dim: int, head: Optional[EpisodeHead] = None,
                 n_out: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feat_dim = feat_dim
        self.classifier = nn.Linear(feat_dim, n_out) if n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier, or the features when there is none."""
        f = self.backbone(x)
        return self.classifier(f) if self.classifier is not None else f


# ----------------------------------------------------------------------------------------------- regularizers
def r_fc(features: torch.Tensor, n_classes: int, per_class: int, eps: float = 1e-6, with_factor: bool = True
         ) -> torch.Tensor:
    """Feature-clustering ratio (spec §5.5): ``(C/N) sum_ij ||phi_ij - mu_i||^2 / sum_i ||mu_i - mu||^2``.

    Args:
        features: ``[C*N, D]`` in class-major order (class i holds rows ``i*N .. i*N+N-1``).
        with_factor: include ``C/N`` (the metric form); False gives the plain ratio (training, spec [CHOICE]).
    """
    phi = features.reshape(n_classes, per_class, -1)
    mu_i = phi.mean(1, keepdim=True)
    within = (phi - mu_i).pow(2).sum()
    between = (mu_i.squeeze(1) - phi.reshape(-1, phi.shape[-1]).mean(0)).pow(2).sum()
    ratio = within / (between + eps)
    return ratio * (n_classes / per_class) if with_factor else ratio


def r_hv(fx1: torch.Tensor, fx2: torch.Tensor, fy1: torch.Tensor, fy2: torch.Tensor, eps: float = 1e-6,
         reference_code: bool = False) -> torch.Tensor:
    """Hyperplane variation (spec §5.5), per row: ``||(fx1 - fy1) - (fx2 - fy2)|| / (||fx1 - fy1|| + ||fx2 - fy2||)``
    for ``[P, D]`` inputs (x from class A, y from class B). ``reference_code``: the public code's variant
    (squared ratio over the *mean* of the norms). Returns ``[P]``."""
    a, b = fx1 - fy1, fx2 - fy2
    num = (a - b).norm(dim=-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    if reference_code:
        return (num / ((na + nb) / 2 + eps)).pow(2)
    return num / (na + nb + eps)


def r_hv_batch(features: torch.Tensor, n_classes: int, per_class: int, eps: float = 1e-6) -> torch.Tensor:
    """Mean R_HV over all ordered class pairs of a class-major batch with ``per_class >= 2`` (the first two images
    of each class)."""
    if per_class < 2:
        raise ValueError(f"r_hv needs per_class >= 2, got {per_class}")
    phi = features.reshape(n_classes, per_class, -1)
    i, j = torch.triu_indices(n_classes, n_classes, 1)
    return r_hv(phi[i, 0], phi[i, 1], phi[j, 0], phi[j, 1], eps).mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` of column-centred ``x [n, D1]``, ``y [n, D2]``."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    return (y.t() @ x).pow(2).sum() / ((x.t() @ x).norm() * (y.t() @ y).norm())
