"""Meta-learning as SSL (spec §7.6): episode builder, task rotation (with the per-view negative control),
ProtoNet = InfoNCE at temperature 0.5 on unit embeddings, R2-D2 with b > D, the auxiliary rotation head, linear
evaluation leaves the backbone untouched. References: plain torch written out here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedaqt.config import RunConfig
from fedaqt.data import views as ssl_views
from fedaqt.data.views import ssl_episode
from fedaqt.models.ssl import linear_eval, nt_xent, ssl_logits
from fedaqt.workloads.ssl_meta import SSLMetaWorkload


def _identity_views(x, m, gen):
    return x.unsqueeze(1).expand(x.shape[0], m, *x.shape[1:]).clone()


def _images(b=6, side=10):
    return torch.rand(b, 1, side, side, generator=torch.Generator().manual_seed(0))


def test_episode_has_one_class_per_base_image(monkeypatch):
    monkeypatch.setattr(ssl_views, "simclr_views", _identity_views)
    x = _images()
    xs, ys, xq, yq, ang = ssl_episode(x, 2, 3, torch.Generator().manual_seed(1))
    assert xs.shape == (12, 1, 10, 10) and xq.shape == (18, 1, 10, 10)
    assert ys.tolist() == [i for i in range(6) for _ in range(2)] and yq.tolist() == [i for i in range(6) for _ in range(3)]
    for v, y in [(xs, ys), (xq, yq)]:
        for img, c in zip(v, y):
            assert torch.equal(img, x[c])  # every view of class c comes from base image c
    assert torch.all(ang == 0)


def test_task_rotation_gives_all_views_of_an_image_one_angle(monkeypatch):
    monkeypatch.setattr(ssl_views, "simclr_views", _identity_views)
    x = _images(16)
    xs, ys, xq, yq, ang = ssl_episode(x, 1, 2, torch.Generator().manual_seed(3), task_rotation=True)
    assert set(ang.tolist()) <= {0, 1, 2, 3} and len(set(ang.tolist())) > 1
    for v, y in [(xs, ys), (xq, yq)]:
        for img, c in zip(v, y):
            assert torch.equal(img, torch.rot90(x[c], int(ang[c]), dims=(-2, -1)))  # rot90 exactly k times
    # negative control: rotating views independently breaks "one angle per base image"
    g = torch.Generator().manual_seed(4)
    views = [torch.rot90(x[int(c)], int(torch.randint(0, 4, (1,), generator=g)), dims=(-2, -1)) for c in yq]
    broken = sum(not torch.equal(views[2 * i], views[2 * i + 1]) for i in range(16))
    assert broken > 0


def test_real_views_are_random_and_in_range():
    x = _images(4, 28)
    v = ssl_views.simclr_views(x, 3, torch.Generator().manual_seed(0))
    assert v.shape == (4, 3, 1, 28, 28) and v.min() >= 0 and v.max() <= 1
    assert not torch.equal(v[:, 0], v[:, 1])


def test_protonet_on_unit_embeddings_is_infonce_at_temperature_half():
    g = torch.Generator().manual_seed(0)
    zs, zq = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.arange(8)
    proto = F.cross_entropy(ssl_logits(zs, y, zq, 8, "protonet", normalize=True, tau=1.0), y)
    a, b = zq / zq.norm(dim=1, keepdim=True), zs / zs.norm(dim=1, keepdim=True)
    infonce = F.cross_entropy(a @ b.t() / 0.5, y)
    assert float(proto) == pytest.approx(float(infonce), abs=1e-10)
    # NT-Xent against a loop written out (Chen et al. 2020 eq. 1)
    z = torch.cat([zs, zq])
    z = z / z.norm(dim=1, keepdim=True)
    tot = 0.0
    for i in range(16):
        j = (i + 8) % 16
        den = sum(torch.exp(z[i] @ z[k] / 0.5) for k in range(16) if k != i)
        tot += -float(torch.log(torch.exp(z[i] @ z[j] / 0.5) / den))
    assert float(nt_xent(zs, zq, 0.5)) == pytest.approx(tot / 16, abs=1e-10)


def test_r2d2_head_is_finite_for_more_classes_than_dimensions():
    g = torch.Generator().manual_seed(0)
    zs, zq = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    y = torch.arange(40)
    logits = ssl_logits(zs, y, zq, 40, "r2d2", lam=1.0)
    # reference: the D x D ridge solve written out
    w = torch.linalg.solve(zs.t() @ zs + torch.eye(16), zs.t() @ F.one_hot(y, 40).float())
    torch.testing.assert_close(logits, zq @ w, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(F.cross_entropy(logits, y))


def _workload(**opts) -> SSLMetaWorkload:
    cfg = RunConfig(workload="ssl-meta", num_clients=4, batch_size=8, seed=0,
                    options={"width": 8, "linear_train": 200, "linear_test": 200, "linear_iters": 20,
                             "fewshot_episodes": 30, "fewshot_query": 5, **opts})
    return SSLMetaWorkload(cfg)


def test_rotation_loss_labels_and_overfit():
    wl = _workload(rot_loss_weight=1.0, rot_fraction=1.0)
    torch.manual_seed(0)
    model = wl.build_model()
    x = torch.rand(4, 1, 28, 28)
    xr = torch.cat([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
    yr = torch.arange(4).repeat_interleave(4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model.rot_head(model(xr)), yr)
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    # the workload's loss uses exactly those labels: with rot_loss_weight the extra term is CE of the same batch
    # (eval-mode BatchNorm: the workload's single forward over all views gives per-image outputs then)
    model.eval()
    batch = (x, torch.arange(4), x.clone(), torch.arange(4))
    base, _ = _workload().loss(model, batch)
    both, _ = wl.loss(model, batch)
    assert float(both - base) == pytest.approx(float(F.cross_entropy(model.rot_head(model(xr)), yr)), abs=1e-5)
    # views already turned by task rotation (angles): the label is the total quarter turns from upright
    angles = torch.tensor([1, 0, 2, 3])
    xt = torch.stack([torch.rot90(x[i], int(angles[i]), dims=(-2, -1)) for i in range(4)])
    batch = (xt, torch.arange(4), xt.clone(), torch.arange(4), angles)
    xtr = torch.cat([torch.rot90(xt, r, dims=(-2, -1)) for r in range(4)])
    want = F.cross_entropy(model.rot_head(model(xtr)), torch.cat([(angles + r) % 4 for r in range(4)]))
    naive = F.cross_entropy(model.rot_head(model(xtr)), yr)  # labels r only: wrong for turned views
    got = wl.loss(model, batch)[0] - _workload().loss(model, batch)[0]
    assert float(got) == pytest.approx(float(want), abs=1e-5) and abs(float(want - naive)) > 1e-3


def test_linear_eval_leaves_the_backbone_bitwise_unchanged():
    wl = _workload()
    model = wl.build_model()
    before = copy.deepcopy(model.state_dict())
    out = wl.evaluate(model, 1)
    assert 0.1 < out["linear_acc"] <= 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    # separable features: linear evaluation finds them
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(30)
    f = F.one_hot(y, 3).float() * 5 + 0.1 * torch.randn(90, 3, generator=g)
    assert linear_eval(f, y, f, y, 50) == 1.0


def test_client_shards_are_disjoint_and_batches_deterministic():
    wl = _workload()
    shards = wl.shards()
    allidx = torch.cat([torch.from_numpy(s) for s in shards])
    assert len(allidx) == len(torch.unique(allidx)) == 60000
    a, b = wl.client_batches(1, 2, 1, 8)[0], wl.client_batches(1, 2, 1, 8)[0]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_protonet_ssl_logits_use_the_mean_of_several_support_views():
    g = torch.Generator().manual_seed(1)
    zs, zq = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    ys = torch.arange(3).repeat_interleave(2)  # 3 base images x 2 support views
    zs_np, zq_np = zs.numpy(), zq.numpy()
    means = [zs_np[2 * c: 2 * c + 2].mean(0) for c in range(3)]
    ref = [[-float(((q - m) ** 2).sum()) for m in means] for q in zq_np]
    torch.testing.assert_close(ssl_logits(zs, ys, zq, 3, "protonet"), torch.tensor(ref, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_fewshot_evaluation_of_the_backbone_is_nearest_class_mean():
    """spec §7 few-shot evaluation: episodes valid (N distinct classes, disjoint images) and each query assigned to
    the nearest support mean, against a numpy loop written out here."""
    import numpy as np

    from fedaqt.data.fewshot import eval_episode_indices
    from fedaqt.models.ssl import prototype_accuracies

    rng = np.random.default_rng(0)
    lab = np.repeat(np.arange(6), 20)
    feats = torch.from_numpy(rng.normal(size=(120, 3)) + lab[:, None] * 0.7)
    by_class = [np.nonzero(lab == c)[0] for c in range(6)]
    eps = eval_episode_indices(by_class, 4, 2, 3, 50, np.random.default_rng(1))
    for s, q in eps:
        assert len(set(s) | set(q)) == 20 and len(set(lab[s])) == 4
        for c in range(4):  # class-major: rows c*K..(c+1)*K are class c, the queries likewise
            assert len(set(lab[s[2 * c:2 * c + 2]]) | set(lab[q[3 * c:3 * c + 3]])) == 1
    ref = []
    for s, q in eps:
        f = feats.numpy()
        means = np.stack([f[s[2 * c:2 * c + 2]].mean(0) for c in range(4)])
        pred = [int(np.argmin(((f[j] - means) ** 2).sum(1))) for j in q]
        ref.append(np.mean(np.array(pred) == np.repeat(np.arange(4), 3)))
    np.testing.assert_allclose(prototype_accuracies(feats, eps, 4), ref, atol=0)
    assert 0.2 < np.mean(ref) < 1.0  # neither trivial nor perfect: the test can tell rules apart
    out = _workload(linear_test=300, fewshot_episodes=20).evaluate(_workload().build_model(), 1)
    assert 0.2 < out["fewshot_acc_1shot"] <= out["fewshot_acc_5shot"] + 0.1 and out["fewshot_ci95_5shot"] > 0


def test_bad_ssl_options_fail_before_work():
    from fedaqt.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size=1"):
        SSLMetaWorkload(RunConfig(workload="ssl-meta", num_clients=4, batch_size=1, seed=0))
    for method, opt in (("simclr", {"views_support": 2}), ("protonet", {"tau": 0.1}), ("r2d2", {"normalize": True})):
        with pytest.raises(ConfigError, match="not used by method"):
            _workload(method=method, **opt)
    _workload(method="protonet", normalize=True, tau=0.1)  # used there: accepted
    from fedaqt.launch.runner import preflight

    with pytest.raises(ConfigError, match="needs a few-shot workload"):  # was an AttributeError traceback
        preflight(RunConfig(workload="ssl-meta", algorithm="fomaml", strategy="fedsgd", num_clients=4,
                            clients_per_round=2, batch_size=8, options={"width": 8}))
