"""WrapNet (spec §3, checks of §3.9) and the image partitions. Fast (seconds), CPU only, real values."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedaqt.data.partition import dirichlet_partition, iid_partition, label_skew
from fedaqt.models.wrapnet import (
    CarryVariance,
    WrapConv2d,
    WrapLinear,
    WrapResNet20,
    WrapVGG7,
    accumulate_register,
    binarize_weight,
    calibrate_fixed_bits,
    carry_count,
    carry_count_closed_form,
    carry_count_surrogate,
    carry_count_tensor,
    carry_variance,
    cyclic,
    cyclic_threshold,
    evaluate,
    hybrid_carry_finetune,
    int_conv2d,
    int_linear,
    measure_carries,
    overflow_penalty,
    overflow_rate,
    pack_lanes,
    packed_accumulate,
    packed_add,
    packed_add_buffered,
    quantize_activation,
    quantize_weight,
    select_layer_step_size,
    select_step_sizes,
    sequential_end_around_carries,
    set_wrapnet_mode,
    ternarize_weight,
    train_pipeline,
    uniform_quantize_weight,
    unpack_lanes,
    wrap_b,
    wrap_layers,
)

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is as fast and avoids OpenMP stalls on a shared 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------- §3.2 cyclic
@pytest.mark.parametrize("b,k", [(8, 2.0), (8, 1.0), (4, 4.0), (12, 10.0)])
def test_cyclic_continuity_zeros_and_periodicity(b, k):
    half = 2.0 ** (b - 1)
    t = cyclic_threshold(b, k)
    for eps in (1e-3, 1e-6):
        lo = cyclic(torch.tensor(half - eps, dtype=D), b, k)
        hi = cyclic(torch.tensor(-half + eps, dtype=D), b, k)
        assert abs(float(lo - hi)) <= 2 * k * eps + 1e-9  # continuous across the wrap point
        for sign in (1, -1):
            left = cyclic(torch.tensor(sign * t - eps, dtype=D), b, k)
            right = cyclic(torch.tensor(sign * t + eps, dtype=D), b, k)
            assert abs(float(left - right)) <= (k + 1) * eps + 1e-9  # continuous at ±T
    zeros = cyclic(torch.tensor([half, -half, 3 * half, -5 * half], dtype=D), b, k)
    assert torch.equal(zeros, torch.zeros(4, dtype=D))  # f(±2^(b-1)) = 0
    z = torch.randint(-256 * int(half), 256 * int(half), (2000,)).to(D) / 64  # dyadic: z + n 2^b is exact
    z_int = torch.randint(-50 * int(half), 50 * int(half), (2000,), dtype=torch.int64)
    for n in (-3, -1, 1, 7):
        assert torch.equal(cyclic(z + n * 2 * half, b, k), cyclic(z, b, k))
        assert torch.equal(cyclic(z_int + n * 2 ** b, b, k), cyclic(z_int, b, k))


@pytest.mark.parametrize("b,k", [(8, 2.0), (8, 10.0), (6, 3.0)])
def test_cyclic_equals_wrap_in_identity_region_and_range(b, k):
    t = cyclic_threshold(b, k)
    z = torch.arange(-4 * 2 ** b, 4 * 2 ** b, 0.25, dtype=D)
    c, w = cyclic(z, b, k), wrap_b(z, b)
    inside = w.abs() <= t
    assert torch.equal(c[inside], w[inside])
    assert not torch.equal(c[~inside], w[~inside])
    dense = torch.linspace(-2 ** (b - 1), 2 ** (b - 1), 200001, dtype=D)
    assert math.isclose(float(cyclic(dense, b, k).abs().max()), t, rel_tol=1e-4)
    assert float(cyclic(dense, b, k).abs().max()) <= t + 1e-12


def test_cyclic_k1_range_and_worked_example():
    dense = torch.linspace(-128, 128, 100001, dtype=D)
    assert math.isclose(float(cyclic(dense, 8, 1.0).abs().max()), 2.0 ** 6, rel_tol=1e-6)  # 2^(b-2)
    assert float(cyclic(torch.tensor(200.0, dtype=D), 8, 2.0)) == -56.0
    assert float(cyclic(torch.tensor(-56.0, dtype=D), 8, 2.0)) == -56.0
    assert float(wrap_b(torch.tensor(200), 8)) == -56


def test_cyclic_autograd_derivative():
    b, k = 8, 2.0
    z = torch.tensor([0.5, 10.0, -80.0, 100.0, -100.0, 200.0, 300.0, -300.0], dtype=D, requires_grad=True)
    cyclic(z, b, k).sum().backward()
    w = wrap_b(z.detach(), b)
    expected = torch.where(w.abs() < cyclic_threshold(b, k), torch.ones_like(w), torch.full_like(w, -k))
    assert torch.equal(z.grad, expected)
    assert set(z.grad.tolist()) == {1.0, -2.0}
    ok = torch.autograd.gradcheck(lambda t: cyclic(t, 8, 3.0), (torch.tensor([3.3, 97.1, -120.2, 400.7], dtype=D, requires_grad=True),))
    assert ok


# ----------------------------------------------------------------------------------------------- §3.1 accumulators
def _numpy_int8_conv(x_q: np.ndarray, w_q: np.ndarray, padding: int) -> np.ndarray:
    """Reference: every product in int8, accumulated in an np.int8 register that wraps on every addition."""
    cols = F.unfold(torch.from_numpy(x_q).double(), w_q.shape[-1], padding=padding).numpy().astype(np.int8)  # [B, K, P]
    w = w_q.reshape(w_q.shape[0], -1).astype(np.int8)  # [O, K]
    prods = (w[None, :, :, None] * cols[:, None, :, :]).astype(np.int8)  # [B, O, K, P]; |x*w| <= 127 here
    with np.errstate(over="ignore"):
        summed = np.add.reduce(prods, axis=2, dtype=np.int8)  # wraps modulo 2^8
        seq = np.cumsum(prods, axis=2, dtype=np.int8)[:, :, -1]  # sequential int8 accumulation
    assert np.array_equal(summed, seq)
    side = x_q.shape[-1]
    return summed.reshape(x_q.shape[0], w_q.shape[0], side, side), prods


def test_int8_accumulator_matches_numpy_wraparound_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(0, 16, (3, 8, 6, 6), generator=g)  # 4-bit activations
    w_q = torch.where(torch.rand(5, 8, 3, 3, generator=g) > 0.2, 1, -1)  # binary weights, mostly +1
    ref, prods = _numpy_int8_conv(x_q.numpy(), w_q.numpy(), padding=1)
    exact = int_conv2d(x_q, w_q, padding=1, acc_bits=64)
    assert (exact.abs() > 127).any()  # the test really overflows
    z8 = int_conv2d(x_q, w_q, padding=1, acc_bits=8)
    assert z8.dtype == torch.int64
    assert np.array_equal(z8.numpy().astype(np.int8), ref)
    assert torch.equal(z8, wrap_b(exact, 8))
    # register-level emulation: wrap after every single addition
    reg = accumulate_register(torch.from_numpy(prods.astype(np.int64)).permute(0, 1, 3, 2), 8)  # [B, O, P]
    assert torch.equal(reg.reshape(z8.shape), z8)
    # linear path
    xl, wl = torch.randint(0, 16, (4, 50), generator=g), torch.randint(-1, 2, (7, 50), generator=g)
    with np.errstate(over="ignore"):
        ref_l = np.add.reduce((xl.numpy()[:, None, :] * wl.numpy()[None]).astype(np.int8), axis=2, dtype=np.int8)
    assert np.array_equal(int_linear(xl, wl, 8).numpy().astype(np.int8), ref_l)


def test_layer_integer_path_equals_exact_emulation_and_acc_switch():
    torch.manual_seed(1)
    layer = WrapConv2d(6, 4, weight_quant="binary", b=8)
    layer.s_x.fill_(0.1)
    layer.act_bits.fill_(4)
    layer.eval()
    x = torch.rand(2, 6, 7, 7) * 2.0
    x_q = quantize_activation(x, 0.1, 4)
    w_q, s_w = binarize_weight(layer.weight)
    scale = (s_w * 0.1).reshape(1, -1, 1, 1)
    layer.act_quant = True
    for acc in (32, 8, 6):
        layer.acc_bits = acc
        z = layer(x) / scale
        ref = int_conv2d(x_q, w_q, padding=1, acc_bits=acc if acc < 32 else 64).to(torch.float32)
        assert torch.allclose(z, ref, atol=1e-3)
    # cyclic on: the b-bit accumulator gives exactly the 32-bit result (periodicity, spec §3.9)
    layer.cyclic = True
    layer.acc_bits = 32
    y32 = layer(x)
    layer.acc_bits = 8
    assert torch.equal(layer(x), y32)


# ----------------------------------------------------------------------------------------------- §3.3 penalty / rate
def test_overflow_penalty_zero_inside_and_gradient_outside():
    b = 8
    z = torch.tensor([-128.0, 0.0, 5.0, 128.0], dtype=D)
    assert float(overflow_penalty(z, b)) == 0.0
    z = torch.tensor([[-200.0, 3.0, 130.0], [128.0, -129.0, 0.0]], dtype=D, requires_grad=True)
    r = overflow_penalty(z, b)
    assert math.isclose(float(r.detach()), (72 + 2 + 1) / 6)
    r.backward()
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=D) / 6
    assert torch.equal(z.grad, expected)
    # strict range: +2^(b-1) overflows, -2^(b-1) does not
    assert overflow_rate(torch.tensor([127, 128, -128, -129]), 8) == 0.5


# ----------------------------------------------------------------------------------------------- §3.4 step size
@pytest.mark.parametrize("p", [0.0, 0.02, 0.05, 0.2])
def test_step_size_search_finest_within_target(p):
    torch.manual_seed(0)
    layer = WrapLinear(256, 32, weight_quant="binary", b=8)
    x = torch.relu(torch.randn(300, 256))
    choice = select_layer_step_size(layer, x, 8, p)
    assert choice.rate <= p or choice.a == 1
    assert choice.rates[choice.a] == choice.rate
    if choice.a < 8:
        assert choice.rates[choice.a + 1] > p  # the next finer step size overflows too often
    # the frozen s_x reproduces the measured rate
    assert math.isclose(float(layer.s_x), float(x.max()) / (2 ** choice.a - 1), rel_tol=1e-6)
    assert int(layer.act_bits) == choice.a
    w_q, _ = binarize_weight(layer.weight.detach())
    z = int_linear(quantize_activation(x, choice.s_x, choice.a), w_q, 64)
    assert overflow_rate(z, 8) == choice.rate
    rates = [choice.rates[a] for a in sorted(choice.rates)]
    assert rates == sorted(rates)  # coarser steps never overflow more here


def test_step_size_search_stops_at_8_bits_when_no_overflow():
    layer = WrapLinear(1, 3, weight_quant="binary", b=8)
    x = torch.full((1000, 1), 0.1)
    x[0] = 1.0  # one sample reaches 255 (overflows), the rest quantize to 26
    choice = select_layer_step_size(layer, x, 8, 0.05)
    assert choice.a == 8 and choice.rate == 0.001 and list(choice.rates) == [8]


# ----------------------------------------------------------------------------------------------- §3.5 carries
@pytest.mark.parametrize("b,v,u,C,r", [
    (4, [7] * 40, 280, 18, 10),
    (4, [7, 7, -3, 5], 32, 2, 2),
    (4, [-1] * 4, 60, 3, 15),
    (8, [-128] * 3 + [127] * 5, 1019, 3, 254),
])
def test_algorithm1_worked_examples(b, v, u, C, r):
    assert carry_count(v, b) == (u, C, r)
    assert carry_count_closed_form(u, b) == (C, r)
    assert int(carry_count_tensor(torch.tensor([u]), b)[0]) == C


def test_algorithm1_zero_product_fix():
    # with the seed's (sign(v)+1)/2 weights a zero product would add 2^(b-1); with 1[v<0] it adds nothing
    assert carry_count([0, 0, 0], 8) == (0, 0, 0)
    assert carry_count([0, 5], 4)[0] == 5


def test_algorithm1_closed_form_and_sequential_on_random_vectors():
    rng = np.random.default_rng(0)
    us, cs = [], []
    for _ in range(10_000):
        b = int(rng.choice([4, 8]))
        v = rng.integers(-(2 ** (b - 1)), 2 ** (b - 1), size=int(rng.integers(1, 60))).tolist()
        u, c, r = carry_count(v, b)
        m = 2 ** b - 1
        assert c == (u - r) // m and (u - r) % m == 0 and r % m == u % m
        seq_c, _ = sequential_end_around_carries(v, b)
        assert abs(seq_c - c) <= 1
        if b == 8:
            us.append(u)
            cs.append(c)
    assert torch.equal(carry_count_tensor(torch.tensor(us), 8), torch.tensor(cs))


def test_carry_surrogate_forward_and_gradient():
    v = torch.tensor([[7.0, 7.0, -3.0, 5.0], [-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    exact = carry_count_surrogate(v, 4, exact_forward=True)
    assert exact.tolist() == [2.0, 3.0]
    soft = carry_count_surrogate(v, 4)
    soft.sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert torch.allclose(soft.detach(), exact.detach(), atol=1.0)


def test_packed_adds_with_python_ints():
    rng = np.random.default_rng(1)
    for _ in range(500):
        a = rng.integers(0, 256, 4).tolist()
        b = rng.integers(0, 256, 4).tolist()
        lanes = packed_add(a, b)
        carry = 0
        for i in range(4):
            assert lanes[i] == (a[i] + b[i] + carry) % 256
            carry = int(a[i] + b[i] + carry >= 256)
        a7 = rng.integers(0, 128, 4).tolist()
        b7 = rng.integers(0, 128, 4).tolist()
        assert packed_add_buffered(a7, b7) == [(x + y) % 128 for x, y in zip(a7, b7)]
    vecs = [rng.integers(0, 128, 4).tolist() for _ in range(30)]
    assert packed_accumulate(vecs, buffer_bit=True) == [int(sum(col)) % 128 for col in zip(*vecs)]
    assert unpack_lanes(pack_lanes([-1, 2, -128, 127]), 4) == [255, 2, 128, 127]
    assert pack_lanes([0x7F] * 4) == 0x7F7F7F7F


def test_carry_variance_regularizer():
    reg = CarryVariance(5)
    reg.train()
    same = torch.tensor([[3.0, 1.0, 0.0, 7.0, 2.0]] * 4)
    assert float(reg(same)) == 0.0  # m_hat initialized to the batch mean
    assert torch.equal(reg.m_hat, same[0])
    diff = same + torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fresh = CarryVariance(5).train()
    assert float(fresh(diff)) > 0
    assert float(carry_variance(diff, diff.mean(0))) > 0
    assert float(carry_variance(same, same.mean(0))) == 0.0
    # EMA update (momentum 0.1)
    reg(same + 10)
    assert torch.allclose(reg.m_hat, same[0] + 1.0)


# ----------------------------------------------------------------------------------------------- §3.1 quantizers
def test_binary_ternary_and_uniform_quantizers():
    w = torch.tensor([[0.5, -0.1, 0.0, -1.4], [0.2, 0.2, -0.2, 0.2]], requires_grad=True)
    q, s = binarize_weight(w)
    assert q.tolist() == [[1, -1, 1, -1], [1, 1, -1, 1]]
    assert torch.allclose(s, torch.tensor([0.5, 0.2]))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # STE
    q, s = ternarize_weight(w.detach())
    # channel 0: mean|w| = 0.5, Δ = 0.35 -> keeps 0.5 and -1.4; channel 1: Δ = 0.14 -> keeps all
    assert q.tolist() == [[1, 0, 0, -1], [1, 1, -1, 1]]
    assert torch.allclose(s, torch.tensor([0.95, 0.2]))
    q, s = uniform_quantize_weight(w.detach().double(), 4)
    assert q.abs().max() <= 7 and torch.equal(q, q.round())
    assert torch.allclose(q * s[:, None], w.detach().double(), atol=float(s.max()) / 2)
    with pytest.raises(ValueError, match="quaternary"):
        quantize_weight(w, "quaternary")
    xq = quantize_activation(torch.tensor([-1.0, 0.04, 0.26, 5.0]), 0.1, 2)
    assert xq.tolist() == [0.0, 0.0, 3.0, 3.0]


# ----------------------------------------------------------------------------------------------- networks
def _tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.3
    for c in range(3):  # class-dependent blobs so that something is learnable
        x[y == c, :, 4 + 8 * c : 10 + 8 * c, 4:24] += 0.7
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def test_networks_shapes_and_first_last_full_precision():
    vgg = WrapVGG7(width=0.0625)
    assert vgg(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert [n for n, _ in wrap_layers(vgg)] == ["conv2", "conv3", "conv4", "conv5", "conv6", "fc1"]
    assert not isinstance(vgg.conv1, WrapConv2d) and not isinstance(vgg.fc2, WrapLinear)
    vgg32 = WrapVGG7(in_channels=3, image_size=32, width=0.0625)
    assert vgg32(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    res = WrapResNet20(in_channels=3, width=0.5)
    assert res(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert len(wrap_layers(res)) == 18
    with pytest.raises(RuntimeError, match="select_step_sizes"):
        set_wrapnet_mode(vgg, act_quant=True)
        vgg(torch.rand(2, 1, 28, 28))


def test_model_acc_switch_cyclic_invariance_and_collapse_without_cyclic():
    torch.manual_seed(0)
    model = WrapVGG7(width=0.125)
    batches = _tiny_data()
    with torch.no_grad():  # populate BatchNorm running statistics (float activations)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()
        for x, _ in batches:
            model(x)
    calibrate_fixed_bits(model, batches[:1], a=6, b=8)  # 6-bit activations: many overflows on purpose
    set_wrapnet_mode(model, act_quant=True, cyclic=True)
    model.eval()
    x = batches[0][0]
    with torch.no_grad():
        set_wrapnet_mode(model, acc_bits=32)
        y32 = model(x)
        set_wrapnet_mode(model, acc_bits=8)
        y8 = model(x)
        assert torch.equal(y32, y8)
        set_wrapnet_mode(model, cyclic=False, acc_bits=32)
        n32 = model(x)
        set_wrapnet_mode(model, acc_bits=8)
        n8 = model(x)
    assert not torch.allclose(n32, n8)
    r = evaluate(model, batches, acc_bits=8)
    assert r["overflow_rate"] > 0 and set(r["overflow_rates"]) == {n for n, _ in wrap_layers(model)}


def test_train_pipeline_and_hybrid_smoke():
    torch.manual_seed(0)
    model = WrapVGG7(width=0.0625)
    batches = _tiny_data(n=64)
    acc = lambda m: evaluate(m, batches)["accuracy"]  # noqa: E731
    out = train_pipeline(model, batches, batches[:1], epochs=(1, 1, 1), eval_fn=acc, lambda_c=1e-3)
    assert set(out["evals"]) == {"pretrain", "warmup", "finetune"}
    assert all(1 <= c.a <= 8 and c.rate <= 0.05 or c.a == 1 for c in out["steps"].values())
    layer = model.conv3
    assert layer.cyclic and layer.act_quant and layer.carry_reg is not None
    stats = measure_carries(model, batches[:1])
    assert set(stats) == {n for n, _ in wrap_layers(model)} and all(s["mean"] >= 0 for s in stats.values())
    rep = hybrid_carry_finetune(model, batches, batches[:1], acc, steps_epochs=0.5, tol=1.0)
    assert set(rep["carry_layers"]) | set(rep["buffer_layers"]) == set(rep["order"])
    assert 0.0 <= rep["final"] <= 1.0


def test_select_step_sizes_on_model_uses_float_inputs():
    torch.manual_seed(0)
    model = WrapVGG7(width=0.0625)
    steps = select_step_sizes(model, _tiny_data(n=32), 8, 0.05, use_batch_stats=True)
    assert set(steps) == {n for n, _ in wrap_layers(model)}
    for n, layer in wrap_layers(model):
        assert float(layer.s_x) == pytest.approx(steps[n].s_x) and steps[n].rate <= 0.05 or steps[n].a == 1
    # BatchNorm running statistics are untouched by the calibration pass
    assert torch.equal(model.bn2.running_mean, torch.zeros_like(model.bn2.running_mean))


# ----------------------------------------------------------------------------------------------- partitions
def test_iid_partition():
    parts = iid_partition(1003, 10, seed=3)
    allidx = np.concatenate(parts)
    assert len(allidx) == 1003 and len(np.unique(allidx)) == 1003
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(1003, 10, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(1003, 10, seed=4)))
    with pytest.raises(ValueError, match="num_clients=20"):
        iid_partition(10, 20, 0)


def test_dirichlet_partition_properties_and_skew():
    labels = np.repeat(np.arange(10), 300)
    np.random.default_rng(0).shuffle(labels)
    skews = {}
    for alpha in (0.05, 0.5, 100.0):
        parts = dirichlet_partition(labels, 20, alpha, seed=1)
        allidx = np.concatenate(parts)
        assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)  # disjoint, cover all
        assert all(len(p) >= 1 for p in parts)
        again = dirichlet_partition(labels, 20, alpha, seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
        skews[alpha] = label_skew(labels, parts)
    assert skews[0.05] > skews[0.5] > skews[100.0]
    assert skews[100.0] < 0.1
    tiny = dirichlet_partition(np.arange(12) % 3, 12, 0.01, seed=0)  # forces the repair path
    assert sorted(np.concatenate(tiny).tolist()) == list(range(12)) and all(len(p) == 1 for p in tiny)
    with pytest.raises(ValueError, match="alpha=0"):
        dirichlet_partition(labels, 5, 0.0, seed=0)
    with pytest.raises(ValueError, match="alpha=-1"):
        dirichlet_partition(labels, 5, -1.0, seed=0)
    with pytest.raises(ValueError, match="num_clients=4000"):
        dirichlet_partition(labels, 4000, 0.5, seed=0)


# ----------------------------------------------------------------------------------------------- workload
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_wrapnet_workload_round_trip():
    from fedaqt.config import RunConfig
    from fedaqt.workloads.wrapnet import WrapNetWorkload

    cfg = RunConfig(workload="wrapnet", num_clients=4, clients_per_round=2, seed=3,
                    options={"eval_size": 200, "train_size": 2000, "calib_size": 64, "width": 0.0625,
                             "partition": "dirichlet", "alpha": 0.5})
    wl = WrapNetWorkload(cfg)
    assert list(wl.eval_columns[:3]) == ["eval_accuracy", "eval_accuracy_acc8", "overflow_rate"]
    assert "overflow_rate_conv2" in wl.eval_columns
    wl.prepare()
    m1, m2 = wl.build_model(), WrapNetWorkload(cfg).build_model()
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert [float(l.s_x) for _, l in wrap_layers(m1)] == [float(l.s_x) for _, l in wrap_layers(m2)]
    b1 = wl.client_batches(1, 5, 2, 8)
    b2 = WrapNetWorkload(cfg).client_batches(1, 5, 2, 8)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(b1, b2))
    assert b1[0][0].shape == (8, 1, 28, 28) and b1[0][0].dtype == torch.float32 and b1[0][1].dtype == torch.int64
    loss, n = wl.loss(m1, b1[0])
    loss.backward()
    assert n == 8 and torch.isfinite(loss) and m1.conv2.weight.grad is not None
    metrics = wl.evaluate(m1, 0)
    assert set(metrics) <= set(wl.eval_columns) and set(wl.eval_columns[:3]) <= set(metrics)
    # cyclic: periodicity, c(wrap_b(z)) = c(z): the b-bit cyclic column equals the cyclic network with a 32-bit
    # accumulator (eval_accuracy itself is now the no-wrap, no-fold network; see the heavy-overflow test below)
    folded32 = evaluate(m1, wl._eval_batches(), act_quant=True, cyclic=True, acc_bits=32)["accuracy"]
    assert folded32 == metrics["eval_accuracy_acc8"]
    assert "eval_accuracy_acc8_nocyclic" in metrics
    assert wl.quantize_filter("conv2", m1.conv2) is False
    with pytest.raises(ValueError, match="option k=0"):
        WrapNetWorkload(RunConfig(options={"k": 0}))


# ----------------------------------------------------------------------------------------------- issue 9 item 4
# Workload-level checks on synthetic images (no dataset needed): the three accumulator columns are three genuinely
# different forward paths, and the client trains exactly the binary/ternary network the server evaluates.
def _synthetic_wrapnet(cfg, n: int = 192, n_eval: int = 96):
    """A WrapNetWorkload whose train/eval data are injected synthetic uint8 images (deterministic)."""
    from fedaqt.workloads.wrapnet import WrapNetWorkload

    wl = WrapNetWorkload(cfg)
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.4
    for c in range(10):  # class-dependent bright rows
        x[y == c, :, 2 * c + 3 : 2 * c + 6, 4:24] += 0.6
    wl._train = ((x.clamp(0, 1) * 255).round().to(torch.uint8), y)
    wl._partitions = [np.arange(i, n, cfg.num_clients) for i in range(cfg.num_clients)]
    xe = wl._train[0][:n_eval].to(torch.float32) / 255.0
    wl._eval = [(xe, y[:n_eval])]
    return wl


def _reference_logits(model, x: torch.Tensor, mode: str, b: int, k: float) -> torch.Tensor:
    """Independent plain forward of the (binary-weight, float-master) WrapVGG7 in eval mode, written from spec
    §3.1-3.2 without the library's layer code: sign(w) (0 -> +1), s_w = mean|w| per output channel,
    x_q = clamp(round(x / s_x), 0, 2^a - 1), exact integer z in float64, then
    mode "none": z as is (32-bit accumulator, no wrap, no fold); "wrap": numpy int64 two's-complement wrap to
    b bits; "cyclic": that wrap followed by the piecewise f of §3.2. Output (value) * s_w * s_x."""
    half = 2 ** (b - 1)
    t = k / (k + 1) * half

    def wrap_layer(layer, h, op):
        w = layer.weight.detach()
        wb = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
        s_w = w.abs().mean(dim=tuple(range(1, w.dim())))
        s_x, a = float(layer.s_x), int(layer.act_bits)
        xq = torch.round(h / s_x).clamp(0, 2 ** a - 1)
        z = op(xq.double(), wb.double()).round()
        if mode != "none":
            zi = z.numpy().astype(np.int64)
            z = torch.from_numpy(((zi + half) % (2 * half) - half).astype(np.float64))
            if mode == "cyclic":
                z = torch.where(z > t, k * half - k * z, torch.where(z < -t, -k * half - k * z, z))
        return z.to(h.dtype) * (s_w * s_x).reshape(1, -1, *([1] * (h.dim() - 2)))

    conv = lambda layer: (lambda u, v: F.conv2d(u, v, None, layer.stride, layer.padding))  # noqa: E731
    m = model
    with torch.no_grad():
        h = F.relu(m.bn1(m.conv1(x)))
        h = F.max_pool2d(F.relu(m.bn2(wrap_layer(m.conv2, h, conv(m.conv2)))), 2)
        h = F.relu(m.bn3(wrap_layer(m.conv3, h, conv(m.conv3))))
        h = F.max_pool2d(F.relu(m.bn4(wrap_layer(m.conv4, h, conv(m.conv4)))), 2)
        h = F.relu(m.bn5(wrap_layer(m.conv5, h, conv(m.conv5))))
        h = F.max_pool2d(F.relu(m.bn6(wrap_layer(m.conv6, h, conv(m.conv6)))), 2)
        h = F.relu(m.bn7(wrap_layer(m.fc1, h.flatten(1), F.linear)))
        return m.fc2(h)


def test_wrapnet_eval_columns_are_distinct_paths_under_heavy_overflow():
    """Forced heavy overflow (p = 1: 8-bit activations everywhere, 8-bit accumulator). Each accuracy column is
    checked against its own independent reference forward: labels are set to that reference's predictions, so
    the column must be exactly 1.0 and the two other columns (different paths) must not."""
    from fedaqt.config import RunConfig

    cfg = RunConfig(workload="wrapnet", bits=32, num_clients=2, clients_per_round=1, seed=5,
                    options={"width": 0.0625, "p": 1.0, "act_bits": 8, "calib_size": 64})
    wl = _synthetic_wrapnet(cfg)
    model = wl.build_model()
    with torch.no_grad():  # BatchNorm running statistics from data, so that predictions vary across images
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()
        model(wl._train[0][:128].to(torch.float32) / 255.0)
    model.eval()
    assert wl.eval_columns[:4] == ("eval_accuracy", "eval_accuracy_acc8", "overflow_rate",
                                   "eval_accuracy_acc8_nocyclic")
    x = wl._eval[0][0]
    preds = {mode: _reference_logits(model, x, mode, 8, 2.0).argmax(1) for mode in ("none", "wrap", "cyclic")}
    column = {"none": "eval_accuracy", "cyclic": "eval_accuracy_acc8", "wrap": "eval_accuracy_acc8_nocyclic"}
    # the three networks really disagree on this data (otherwise the check below could not tell them apart)
    assert (preds["none"] != preds["wrap"]).any() and (preds["none"] != preds["cyclic"]).any()
    assert (preds["wrap"] != preds["cyclic"]).any()
    for mode, labels in preds.items():
        wl._eval = [(x, labels)]
        metrics = wl.evaluate(model, 1)
        assert metrics[column[mode]] == 1.0, (mode, metrics)
        for other, col in column.items():
            if other != mode:
                assert metrics[col] < 1.0, (mode, col, metrics)
                assert metrics[col] == pytest.approx(float((preds[other] == labels).float().mean()))
    assert metrics["overflow_rate"] > 0.3  # heavy overflow really was forced
    assert set(metrics) == set(wl.eval_columns)


class _WeightRecorder:
    """Stands in for ``torch.nn.functional`` inside fedaqt.models.wrapnet.layers and records the weight operand of every
    WrapNet conv2d/linear call (the first and last layers are plain torch modules and are not recorded)."""

    def __init__(self, real) -> None:
        self.real, self.weights = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def conv2d(self, x, w, *args, **kw):
        self.weights.append(w.detach().clone())
        return self.real.conv2d(x, w, *args, **kw)

    def linear(self, x, w, *args, **kw):
        self.weights.append(w.detach().clone())
        return self.real.linear(x, w, *args, **kw)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("weight_quant", ["binary", "ternary"])
def test_wrapnet_client_trains_exactly_the_weights_the_server_evaluates(monkeypatch, bits, weight_quant):
    """Broadcast at int8/int4 through the real encoder/decoder/loader: the binary/ternary weights the client uses
    in its training forward (client_round) and in evaluation, and every WrapNet layer's output, are bit for bit
    those of the server's evaluation, including weights that quantize to code 0 (w == 0 and tiny negatives)."""
    import fedaqt.models.wrapnet.layers as wn  # the module whose F the WrapNet layers call
    from fedaqt.client.trainer import build_client_model, client_round, load_broadcast
    from fedaqt.config import RunConfig
    from fedaqt.quant.wire import decode_broadcast, encode_broadcast
    from fedaqt.server.app import float_state_split, make_spec

    cfg = RunConfig(workload="wrapnet", bits=bits, algorithm="fedsgd", num_clients=2, clients_per_round=1,
                    batch_size=16, seed=2, options={"width": 0.0625, "weight_quant": weight_quant, "calib_size": 64})
    server_wl = _synthetic_wrapnet(cfg)
    model = server_wl.build_model()
    planted = {}
    with torch.no_grad():
        for name, layer in wrap_layers(model):
            flat = layer.weight.view(-1)
            flat[:4] = 0.0
            flat[4:12] = -1e-6 * torch.arange(1, 9, dtype=flat.dtype)  # negative, but |w| << s/2: code 0
            planted[name] = torch.arange(12)
    spec = make_spec(cfg, server_wl, model)
    assert spec.quantized_keys == {f"{n}.weight" for n, _ in wrap_layers(model)}
    params, buffers = float_state_split(model)
    state = {k: torch.from_numpy(v) for k, v in {**params, **buffers}.items()}
    decoded = decode_broadcast(*encode_broadcast(state, spec.quantized_keys, bits, cfg.granularity))
    for name, idx in planted.items():
        assert (decoded[f"{name}.weight"].codes.reshape(-1)[idx] == 0).all()

    client_wl = _synthetic_wrapnet(cfg)
    client = build_client_model(client_wl, cfg)  # builds (and calibrates) before any weight is recorded
    load_broadcast(client, decoded)
    rec = _WeightRecorder(wn.F)
    monkeypatch.setattr(wn, "F", rec)
    server_wl._eval = [(server_wl._eval[0][0][:32], server_wl._eval[0][1][:32])]
    outputs: list[torch.Tensor] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: outputs.append(out.detach().clone()) if isinstance(mod, (WrapConv2d, WrapLinear)) else None)
    try:
        server_wl.evaluate(model, 1)
        server_w, rec.weights = rec.weights, []
        server_out, outputs[:] = list(outputs), []
        evaluate(client, server_wl._eval, act_quant=True, cyclic=True, acc_bits=8)  # before training moves BN
        eval_w, rec.weights = rec.weights, []
        client_out, outputs[:] = list(outputs), []
        client_round(client_wl, client, cfg, 0, 1)  # FedSGD: one training forward + backward
        train_w = rec.weights
    finally:
        hook.remove()
    n_layers = len(wrap_layers(model))
    passes = len(server_w) // n_layers  # 3 accumulator passes (test above)
    assert passes >= 2 and len(server_w) == passes * n_layers and len(train_w) == len(eval_w) == n_layers
    allowed = {-1.0, 1.0} if weight_quant == "binary" else {-1.0, 0.0, 1.0}
    for i, (name, _) in enumerate(wrap_layers(model)):
        ref = server_w[i]
        assert set(ref.unique().tolist()) <= allowed
        for p in range(passes):  # the server's accumulator passes use one set of weights
            assert torch.equal(server_w[p * n_layers + i], ref), name
        assert torch.equal(train_w[i], ref), f"{name}: client trains other weights than the server evaluates"
        assert torch.equal(eval_w[i], ref), name
        got = ref.reshape(-1)[planted[name]]
        assert torch.equal(got, torch.full_like(got, 1.0 if weight_quant == "binary" else 0.0)), name
    # per-layer outputs of the b-bit cyclic pass (2nd server pass): same w_q, s_w, s_x and inputs => equal
    assert len(server_out) == passes * n_layers and len(client_out) == n_layers
    for i in range(n_layers):
        assert torch.equal(client_out[i], server_out[n_layers + i])


@pytest.mark.parametrize("bits", [8, 4])
def test_wrapnet_client_model_holds_codes_and_scales_only(bits):
    """The client model keeps no float copy of the WrapNet weights: no such parameter, only int8 codes + float32
    scale buffers (like QuantLinear/QuantConv1d), and autograd saves no float tensor shaped like those weights
    during a training step (the integer operands are kept as int8/uint8)."""
    from fedaqt.client.trainer import build_client_model
    from fedaqt.config import RunConfig
    from fedaqt.quant.convert import quant_layers
    from fedaqt.quant.layers import QuantLayer

    for gran in ("tensor", "channel"):
        cfg = RunConfig(workload="wrapnet", bits=bits, granularity=gran, num_clients=2, clients_per_round=1,
                        batch_size=8, options={"width": 0.0625, "calib_size": 32})
        wl = _synthetic_wrapnet(cfg, n=64, n_eval=8)
        server = wl.build_model()
        shapes = {n: tuple(layer.weight.shape) for n, layer in wrap_layers(server)}
        client = build_client_model(wl, cfg)
        params = dict(client.named_parameters())
        assert not any(f"{n}.weight" in params for n in shapes)
        assert set(quant_layers(client)) == {f"{n}.weight" for n in shapes}
        for n, layer in wrap_layers(client):
            tensors = {k: v for k, v in layer.state_dict(keep_vars=True).items()}
            tensors.update({k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)})
            for k, v in tensors.items():
                if v.numel() == math.prod(shapes[n]):
                    assert k == "qweight.codes" and v.dtype == torch.int8 and tuple(v.shape) == shapes[n], (n, k)
            scale = layer.qweight.scale
            assert isinstance(layer.qweight, QuantLayer) and scale.dtype == torch.float32
            assert tuple(scale.shape) == (() if gran == "tensor" else (shapes[n][0],))
            assert int(layer.qweight.codes.abs().max()) <= 2 ** (bits - 1) - 1
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        x, y = wl.client_batches(0, 1, 1, 8)[0]
        client.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = wl.loss(client, (x, y))
        loss.backward()
        float_weight_like = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes.values()]
        assert float_weight_like == [], float_weight_like
        assert all(layer.qweight.weight_grad is not None for _, layer in wrap_layers(client))


@pytest.mark.parametrize("weight_quant", ["binary", "ternary"])
def test_wrapnet_codes_client_gradient_and_fedavg_step_match_plain_autograd(weight_quant):
    """The codes-only client layer back-propagates like plain autograd through the float layer at W = s*q:
    FedSGD uploads dL/dŵ equal to torch.autograd on a float copy holding ŵ, and one FedAvg step's final codes
    equal a max-abs re-quantization (written here) of ŵ - lr * that gradient."""
    from fedaqt.client.trainer import build_client_model, client_round, load_broadcast
    from fedaqt.config import RunConfig
    from fedaqt.quant.wire import decode_broadcast, encode_broadcast
    from fedaqt.server.app import float_state_split, make_spec

    base = dict(workload="wrapnet", bits=8, num_clients=2, clients_per_round=1, batch_size=16, seed=4, lr=0.5,
                options={"width": 0.0625, "weight_quant": weight_quant, "calib_size": 64})
    results = {}
    for algorithm in ("fedsgd", "fedavg"):
        cfg = RunConfig(algorithm=algorithm, local_steps=1, **base)
        wl = _synthetic_wrapnet(cfg)
        server = wl.build_model()
        spec = make_spec(cfg, wl, server)
        params, buffers = float_state_split(server)
        state = {k: torch.from_numpy(v) for k, v in {**params, **buffers}.items()}
        decoded = decode_broadcast(*encode_broadcast(state, spec.quantized_keys, 8, cfg.granularity))
        client = build_client_model(wl, cfg)
        load_broadcast(client, decoded)
        results[algorithm] = client_round(wl, client, cfg, 1, 3, final_codes=algorithm == "fedavg")
    # reference: the float model with ŵ = s*q as ordinary parameters, same batch, same seed, plain autograd
    ref = wl.build_model()
    with torch.no_grad():
        for key, value in decoded.items():
            target = dict(ref.named_parameters()).get(key)
            if target is None:
                target = dict(ref.named_buffers())[key]
            target.copy_(value.dequantize() if hasattr(value, "dequantize") else value)
    torch.manual_seed(hash((cfg.seed, 1, 3)) % (2**31))
    ref.train()
    loss, _ = wl.loss(ref, wl.client_batches(1, 3, 1, cfg.batch_size)[0])
    keys = sorted(spec.quantized_keys)
    grads = torch.autograd.grad(loss, [dict(ref.named_parameters())[k] for k in keys])
    sgd = results["fedsgd"].update
    avg = results["fedavg"]
    assert set(avg.final_code_keys) == set(keys)
    for key, g in zip(keys, grads):
        assert g.abs().sum() > 0, key
        torch.testing.assert_close(sgd[key], g, rtol=1e-5, atol=1e-8)
        w_new = decoded[key].dequantize() - cfg.lr * g
        s = w_new.abs().max() / 127
        q_ref = torch.clamp(torch.round(w_new / s), -127, 127)
        codes = avg.upload.entries[key][key].to(torch.float32)
        assert (codes != q_ref).float().mean() < 1e-3, key  # equal up to float ties of round()
        assert torch.equal(avg.upload.entries[key][key + "::scale"], s.expand(codes.shape[0]).to(torch.float32))
