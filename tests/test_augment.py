"""Episode augmentation and Meta-MaxUp (spec §6.5): mode isolation, task rotation, shot copies, query CutMix,
the worst-case selection of Meta-MaxUp (independent references: plain torch ops written out here)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedaqt.config import ConfigError
from fedaqt.data.augment import AugTask, Draw, mixed_ce, parse_augment, sample_draws
from fedaqt.workloads.fewshot import FewShotWorkload
from test_fewshot_workload import _cfg, glyph_dir  # noqa: F401  (fixture)

N, K, Q = 5, 2, 3


def _task(seed: int = 0, side: int = 12) -> AugTask:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(N * K, 1, side, side, generator=g)
    xq = torch.rand(N * Q, 1, side, side, generator=g)
    return AugTask(xs, torch.arange(N).repeat_interleave(K), xq, torch.arange(N).repeat_interleave(Q), N)


def _apply(spec: str, seed: int = 1, task: AugTask | None = None) -> tuple[AugTask, AugTask]:
    t = task or _task()
    (elem,) = parse_augment(spec)
    return t, Draw(elem, seed).apply(t)


@pytest.mark.parametrize("tech", ["selfmix", "erase", "rotation", "flip", "crop", "randrot", "drop_channel",
                                  "solarize"])
def test_support_mode_leaves_query_bitwise_and_query_mode_leaves_support(tech):
    t, a = _apply(f"support:{tech}")
    assert torch.equal(a.x_q, t.x_q) and torch.equal(a.y_q, t.y_q) and a.x_s.shape == t.x_s.shape
    assert not torch.equal(a.x_s, t.x_s)
    t, a = _apply(f"query:{tech}")
    assert torch.equal(a.x_s, t.x_s) and torch.equal(a.y_s, t.y_s) and a.x_q.shape == t.x_q.shape
    assert not torch.equal(a.x_q, t.x_q)


def test_task_rotation_rotates_each_class_by_one_angle():
    seen = set()
    for seed in range(8):
        t, a = _apply("task:rotation", seed)
        assert torch.equal(a.y_s, t.y_s) and torch.equal(a.y_q, t.y_q)
        for c in range(N):
            imgs = torch.cat([t.x_s[t.y_s == c], t.x_q[t.y_q == c]])
            out = torch.cat([a.x_s[a.y_s == c], a.x_q[a.y_q == c]])
            ks = [k for k in range(4) if torch.equal(torch.rot90(imgs, k, dims=(-2, -1)), out)]
            assert len(ks) == 1  # one angle for every image of the class, support and query alike
            seen.add(ks[0])
    assert seen == {0, 1, 2, 3}
    # negative control: per-image rotation (query mode) does not rotate a class uniformly
    t, a = _apply("query:rotation", 3)
    bad = 0
    for c in range(N):
        imgs, out = t.x_q[t.y_q == c], a.x_q[a.y_q == c]
        bad += not any(torch.equal(torch.rot90(imgs, k, dims=(-2, -1)), out) for k in range(4))
    assert bad > 0


@pytest.mark.parametrize("spec,copies", [("shot:flip", 1), ("shot:flip+shot:crop", 2)])
def test_shot_mode_multiplies_support_and_duplicates_labels(spec, copies):
    t, a = _apply(spec)
    assert a.x_s.shape[0] == N * K * (1 + copies)
    assert torch.equal(a.y_s, t.y_s.repeat(1 + copies))
    assert torch.equal(a.x_s[: N * K], t.x_s)
    if spec == "shot:flip":
        assert torch.equal(a.x_s[N * K:], torch.flip(t.x_s, dims=(-1,)))
    assert torch.equal(a.x_q, t.x_q)


def test_query_cutmix_lambda_is_the_kept_area_and_partners_come_from_the_task():
    for seed in range(6):
        t, a = _apply("query:cutmix", seed)
        lam = a.lam_q
        assert torch.all(lam == lam[0]) and 0 <= float(lam[0]) <= 1
        changed = (a.x_q != t.x_q).any(0).any(0)  # pixels changed in some query image: inside the box
        # find the partner of each query: an image of the same task's query set equal to it inside the box
        box = (a.x_q != t.x_q).any(1)  # [n_q, H, W]
        area = box.any(0).double().mean()
        assert float(lam[0]) == pytest.approx(1 - float(area), abs=1e-12) or changed.sum() == 0
        for i in range(N * Q):
            m = box.any(0)
            js = [j for j in range(N * Q) if torch.equal(a.x_q[i][:, m], t.x_q[j][:, m])]
            assert js and int(a.y_q2[i]) in [int(t.y_q[j]) for j in js]
        assert sorted(a.y_q2.tolist()) == sorted(t.y_q.tolist())  # a permutation of the task's own queries
    logits = torch.randn(N * Q, N, dtype=torch.float64)
    one = replace(a, lam_q=torch.ones(N * Q, dtype=torch.float64))
    assert float(mixed_ce(logits, one)) == pytest.approx(float(F.cross_entropy(logits, a.y_q)), abs=1e-12)
    l = float(a.lam_q[0])
    ref = l * F.cross_entropy(logits, a.y_q) + (1 - l) * F.cross_entropy(logits, a.y_q2)
    assert float(mixed_ce(logits, a)) == pytest.approx(float(ref), abs=1e-12)


def test_task_combine_merges_two_classes():
    t, a = _apply("task:combine", 2)
    assert a.n_way == N - 1 and set(a.y_s.tolist()) == set(range(N - 1)) and torch.equal(a.x_s, t.x_s)


def test_draws_are_frozen_and_the_first_draw_does_not_depend_on_m():
    pool = parse_augment("medium")
    d1 = sample_draws(pool, 1, np.random.default_rng(5))
    d4 = sample_draws(pool, 4, np.random.default_rng(5))
    assert d1[0] == d4[0]
    t = _task()
    a, b = d4[2].apply(t), d4[2].apply(t)
    assert torch.equal(a.x_s, b.x_s) and torch.equal(a.x_q, b.x_q)


@pytest.mark.parametrize("bad", ["q:nope", "support:cutmix", "x:flip", "q:cutmix+q:mixup", "flip"])
def test_parse_augment_names_the_bad_item(bad):
    with pytest.raises(ValueError, match="augment"):
        parse_augment(bad)


# ---------------------------------------------------------------------------------------------- Meta-MaxUp
@dataclass(frozen=True)
class _Fixed:
    """A hand-made draw: identity, or label-destroying noise (the images replaced by noise)."""

    noise: bool

    def apply(self, task: AugTask) -> AugTask:
        if not self.noise:
            return task
        g = torch.Generator().manual_seed(9)
        return replace(task, x_s=torch.rand(task.x_s.shape, generator=g), x_q=torch.rand(task.x_q.shape, generator=g))


def _workload(glyph_dir, **opts) -> FewShotWorkload:  # noqa: F811
    wl = FewShotWorkload(_cfg(glyph_dir, options={"method": "protonet", "augment": "medium", "maxup": 4, **opts}))
    wl.prepare()
    return wl


def _bn_state(model):
    return [b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n]


@pytest.mark.parametrize("method", ["protonet", "r2d2", "svm"])  # every head of the fewshot workload (spec §5.2)
def test_maxup_selects_the_max_and_recomputes_it_with_grad(glyph_dir, method):  # noqa: F811
    wl = _workload(glyph_dir, method=method)
    torch.manual_seed(0)
    model = wl.build_model()
    for _ in range(3):  # a few steps so the model is not at its symmetric initialization
        ep = wl.client_batches(0, 1, 1, 4)[0]
        wl.loss(model, ep)[0].backward()
    ep = wl.client_batches(0, 2, 1, 4)[0]
    assert len(ep) == 5 and len(ep[4]) == 4
    task = AugTask(*ep[:4], n_way=5)
    # independent reference: each draw's loss by plain forward on a deep copy (train-mode BN, batch statistics)
    refs = []
    for d in ep[4]:
        m = copy.deepcopy(model)
        at = d.apply(task)
        f = m.backbone(torch.cat([at.x_s, at.x_q]))
        with torch.no_grad():
            refs.append(float(mixed_ce(m.head(f[: len(at.y_s)], at.y_s, f[len(at.y_s):], at.n_way), at)))
    chosen = copy.deepcopy(model)
    before = _bn_state(model)
    loss, losses, k = wl.maxup_loss(model, task, list(ep[4]))
    np.testing.assert_allclose(losses, refs, rtol=0, atol=1e-6)
    assert k == int(np.argmax(refs)) and all(float(loss.detach()) >= c - 1e-6 for c in losses)
    assert float(loss.detach()) == pytest.approx(max(losses), abs=1e-6)
    # BN running stats: exactly those of one train-mode forward of the chosen draw (selection passes left no trace)
    at = ep[4][k].apply(task)
    with torch.no_grad():
        chosen.backbone(torch.cat([at.x_s, at.x_q]))
    for a, b in zip(_bn_state(model), _bn_state(chosen)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before, _bn_state(model)))
    # one backward: the selection passes built no graph
    calls = []
    h = next(model.backbone.parameters()).register_hook(lambda g: calls.append(1))
    loss.backward()
    h.remove()
    assert len(calls) == 1
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_maxup_picks_noise_over_identity_and_m1_is_random_augmentation(glyph_dir):  # noqa: F811
    wl = _workload(glyph_dir)
    torch.manual_seed(1)
    model = wl.build_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for r in range(15):  # learn the task a little so real images are easier than noise
        opt.zero_grad()
        xs, ys, xq, yq = wl.client_task(0, r + 1, 0)
        wl.episode_loss(model, AugTask(xs, ys, xq, yq, 5)).backward()
        opt.step()
    task = AugTask(*wl.client_task(0, 99, 0), n_way=5)
    _, losses, k = wl.maxup_loss(model, task, [_Fixed(False), _Fixed(True)])
    assert k == 1 and losses[1] > losses[0]
    _, losses, k = wl.maxup_loss(model, task, [_Fixed(True), _Fixed(False)])
    assert k == 0
    # m = 1 under the same seed is the first draw of m = 4 (random augmentation, no selection pass)
    wl1 = _workload(glyph_dir, maxup=1)
    ep1, ep4 = wl1.client_batches(1, 3, 1, 4)[0], wl.client_batches(1, 3, 1, 4)[0]
    assert ep1[4] == ep4[4][:1]
    m1, m4 = copy.deepcopy(model), copy.deepcopy(model)
    l1 = wl1.loss(m1, ep1)[0]
    l_direct = wl.episode_loss(m4, ep4[4][0].apply(AugTask(*ep4[:4], n_way=5)))
    assert float(l1) == pytest.approx(float(l_direct), abs=1e-6)


def test_augment_options_are_checked_before_work(glyph_dir):  # noqa: F811
    with pytest.raises(Exception, match="q:bogus"):
        FewShotWorkload(_cfg(glyph_dir, options={"augment": "q:bogus"}))
    with pytest.raises(ConfigError, match="maxup"):
        FewShotWorkload(_cfg(glyph_dir, options={"maxup": 4}))
    with pytest.raises(ConfigError, match="classical"):
        FewShotWorkload(_cfg(glyph_dir, options={"method": "classical", "augment": "q:cutmix"}))
    with pytest.raises(ConfigError, match="combine x2"):  # two merges in one element: 3 classes -> 1
        FewShotWorkload(_cfg(glyph_dir, options={"augment": "t:combine+t:combine,q:cutmix", "n_way": 3}))
    FewShotWorkload(_cfg(glyph_dir, options={"augment": "t:combine+t:combine", "n_way": 4}))  # 4 -> 2: fine
    with pytest.raises(ConfigError, match="drop_channel"):  # glyphs have one channel
        FewShotWorkload(_cfg(glyph_dir, options={"augment": "s:drop_channel"}))
    with pytest.raises(ValueError, match="twice"):
        parse_augment("k:flip+k:flip")
    assert parse_augment("q: cutmix + t:rotation ") == [(("query", "cutmix"), ("task", "rotation"))]
    assert len(parse_augment("k:crop+k:crop")[0]) == 2  # random crops: two different copies, allowed


def test_eval_flip_shots_doubles_the_support_with_flipped_features(glyph_dir):  # noqa: F811
    wl = FewShotWorkload(_cfg(glyph_dir, options={"method": "protonet", "eval_flip_shots": True}))
    wl.prepare()
    model = wl.build_model()
    feats, flips = wl.pool_features(model), wl.pool_features(model, flip=True)
    acc = wl.episode_accuracies(model, 1, feats, flips)
    # reference: per episode, prototypes = mean of the original and flipped support features (plain torch)
    ref = []
    for s, q in wl.eval_episode_indices(1):
        s, q = torch.from_numpy(s), torch.from_numpy(q)
        protos = (feats[s] + flips[s]) / 2  # 1 shot: class-major, one original + one flip per class
        d2 = ((feats[q].unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
        yq = torch.arange(5).repeat_interleave(wl.options.eval_query)
        ref.append(float((d2.argmin(1) == yq).double().mean()))
    np.testing.assert_allclose(acc, ref, atol=1e-12)


def test_expanded_rotation_pool_draws_class_angle_pairs_uniformly():
    """spec §6.1 [CHOICE]: N (class, angle) pairs from classes x 4; one base class may appear at two angles with
    disjoint images. Reference: for 2 base classes and 2-way episodes, P(same base) = 2*C(4,2)/C(8,2) = 12/28."""
    from math import comb

    from fedaqt.data.fewshot import ClassPool, sample_rotation_episode

    labels = np.repeat(np.arange(3), 12)
    images = torch.arange(36, dtype=torch.uint8).reshape(36, 1, 1, 1)  # pixel value = image index
    pool = ClassPool(images, torch.from_numpy(labels), ["a", "b", "c"])
    same, trials = 0, 3000
    for seed in range(trials):
        ep, angles = sample_rotation_episode(pool, 2, 2, 3, np.random.default_rng(seed), classes=np.array([0, 2]))
        idx = torch.cat([ep.x_s, ep.x_q]).flatten().tolist()
        assert len(set(idx)) == len(idx) == 10  # disjoint images, also across two angles of one base class
        for n in range(2):  # every image of episode class n comes from its base class
            got = torch.cat([ep.x_s[ep.y_s == n], ep.x_q[ep.y_q == n]]).flatten().long()
            assert set(labels[got.numpy()]) == {int(ep.classes[n])}
        pairs = {(int(c), int(a)) for c, a in zip(ep.classes, angles)}
        assert len(pairs) == 2 and set(angles.tolist()) <= {0, 1, 2, 3} and set(ep.classes) <= {0, 2}
        same += int(ep.classes[0] == ep.classes[1])
    p = 2 * comb(4, 2) / comb(8, 2)
    assert abs(same / trials - p) < 4 * np.sqrt(p * (1 - p) / trials)


def test_expanded_rotation_episodes_are_rotated_by_their_pair_angles(glyph_dir):  # noqa: F811
    wl = FewShotWorkload(_cfg(glyph_dir, options={"method": "protonet", "augment": "q:cutmix+t:rotation",
                                                  "maxup": 2}))
    wl.prepare()
    assert wl.expanded_rotation
    (x_s, y_s, x_q, y_q), angles = wl.client_episode(0, 1, 0)
    ep = wl.client_batches(0, 1, 1, 1)[0]
    assert torch.equal(ep[0], x_s) and torch.equal(ep[2], x_q)  # the sampled images, unrotated
    for d in ep[4]:
        assert d.angles == tuple(int(a) for a in angles)
        t = d.apply(AugTask(x_s, y_s, x_q, y_q, 5))
        for c in range(5):  # support: rotated by the pair's angle (query is CutMixed as well; not compared)
            assert torch.equal(t.x_s[y_s == c], torch.rot90(x_s[y_s == c], int(angles[c]), dims=(-2, -1)))
    # a pool element without task:rotation would see the unrotated pairs: auto falls back, explicit is refused
    assert not FewShotWorkload(_cfg(glyph_dir, options={"method": "protonet", "augment": "medium"})).expanded_rotation
    with pytest.raises(ConfigError, match="rotation_pool"):
        FewShotWorkload(_cfg(glyph_dir, options={"method": "protonet", "augment": "medium",
                                                 "rotation_pool": "expanded"}))
