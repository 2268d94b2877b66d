"""Spec §2.6 FedAvg re-quantization on the client (spec §2.2 step 4), against an independent reference.

After every local step each quantized layer holds integer codes with |q| <= t_b, the max-abs code at exactly t_b
(fresh max-abs scale), and the round's update of a quantized tensor is s_T q_T - s_0 q_0. The local loop itself
is checked against a reference written here with plain torch (no fedaqt quantizer, layer or trainer): for
t = 0..T-1, ŵ_t = s_t q_t, g_t = autograd of the batch loss at ŵ_t (int8 dynamic activations, STE),
w' = ŵ_t - η g_t, (q_{t+1}, s_{t+1}) = quantize(w') with s = amax|w'|/t_b; float parameters take plain SGD steps.
"""

import pytest
import torch
import torch.nn.functional as F

from fedaqt.client.trainer import build_client_model, client_round
from fedaqt.config import RunConfig
from fedaqt.quant.convert import quant_layers
from fedaqt.quant.layers import QuantLayer
from fedaqt.quant.quantize import dequantize, qmax
from toy import ToyWorkload

QUANTIZED = ("enc1.weight", "enc2.weight")


def ref_quantize(w, bits, granularity):
    """(codes as float64, scale broadcastable) with s = max(amax|w|/t_b, 1e-12), round half to even (spec 1.1)."""
    t = 2 ** (bits - 1) - 1
    a = w.abs().amax() if granularity == "tensor" else w.abs().amax(dim=1, keepdim=True)
    s = torch.clamp(a / t, min=1e-12)
    return torch.clamp(torch.round(w / s), -t, t), s


def ref_act(x):
    """Dynamic per-tensor int8 activation quantization with a detached scale and an STE round (spec 1.1)."""
    s = torch.clamp(x.detach().abs().amax() / 127, min=1e-12)
    xq = torch.clamp(torch.round(x.detach() / s), -127, 127) * s
    return x + (xq - x).detach()


def reference_fedavg(wl, bits, granularity, client_id, round_num, steps, lr):
    """The client's FedAvg round the plain way; returns (delta per state key, start Q(w) per quantized key)."""
    state = {k: v.detach().clone() for k, v in wl.build_model().state_dict().items()}
    wq = {k: ref_quantize(state[k], bits, granularity) for k in QUANTIZED}
    w_hat = {k: q * s for k, (q, s) in wq.items()}
    start = {k: v.clone() for k, v in w_hat.items()}
    floats = {k: v.clone() for k, v in state.items() if k not in QUANTIZED}
    for x, y in wl.client_batches(client_id, round_num, steps, 2):
        P = {k: v.clone().requires_grad_(True) for k, v in {**w_hat, **floats}.items()}
        h = x
        for name in ("enc1", "enc2"):
            h = torch.tanh(ref_act(h) @ P[f"{name}.weight"].T + P[f"{name}.bias"])
        F.cross_entropy(h @ P["dec.weight"].T + P["dec.bias"], y).backward()
        with torch.no_grad():
            for k in QUANTIZED:
                q, s = ref_quantize(w_hat[k] - lr * P[k].grad, bits, granularity)
                w_hat[k] = q * s
            for k in floats:
                floats[k] = floats[k] - lr * P[k].grad
    delta = {k: w_hat[k] - start[k] for k in QUANTIZED}
    delta.update({k: floats[k] - state[k] for k in floats})
    return delta, start


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_requantized_after_every_local_step(monkeypatch, bits, granularity):
    torch.set_num_threads(1)
    # nearest rounding (the reference below); stochastic re-quantization is tested in test_algorithms.py
    cfg = RunConfig(workload="toy", strategy="fedavg", algorithm="fedavg", bits=bits, granularity=granularity,
                    local_steps=4, lr=0.5, num_clients=3, clients_per_round=3, rounds=1, seed=0,
                    options={"stochastic_rounding": False})
    wl = ToyWorkload(cfg)
    model = build_client_model(wl, cfg)
    layers = quant_layers(model)
    start = {k: dequantize(l.codes.clone(), l.scale.clone()) for k, l in layers.items()}
    seen: dict[str, list] = {k: [] for k in layers}
    original = QuantLayer.requantize_

    def recording(self, w, generator=None):
        assert generator is None  # nearest rounding requested
        out = original(self, w, generator)
        seen[self.weight_key].append((self.codes.clone(), self.scale.clone()))
        return out

    monkeypatch.setattr(QuantLayer, "requantize_", recording)
    res = client_round(wl, model, cfg, client_id=2, round_num=1)
    t = qmax(bits)
    for key, steps in seen.items():
        assert len(steps) == cfg.local_steps, key
        for codes, scale in steps:
            assert codes.dtype == torch.int8
            assert codes.abs().max() <= t
            per_row = codes.abs().amax(dim=1) if granularity == "channel" else codes.abs().max().reshape(1)
            assert (per_row == t).all(), key  # the max-abs entry sits at ±t_b
            w = dequantize(codes, scale)
            ratio = w / (scale.reshape(-1, 1) if scale.dim() == 1 else scale)
            torch.testing.assert_close(ratio, ratio.round(), atol=1e-9, rtol=0)
        final_codes, final_scale = steps[-1]
        torch.testing.assert_close(res.update[key].double(), (dequantize(final_codes, final_scale) - start[key]).double(),
                                   atol=1e-6, rtol=0)
    assert 0 < res.metrics["changed_fraction"] <= 1

    # the local loop equals the independent reference: descent steps, re-quantized after every step
    ref, ref_start = reference_fedavg(wl, bits, granularity, client_id=2, round_num=1, steps=cfg.local_steps, lr=cfg.lr)
    for key in QUANTIZED:
        assert torch.equal(start[key], ref_start[key]), key
    assert set(res.update) == set(ref)
    for key in ref:
        assert ref[key].abs().max() > 1e-3, key  # every tensor moves
        torch.testing.assert_close(res.update[key].double(), ref[key], atol=1e-6, rtol=0, msg=key)


def test_fedavg_round_lowers_the_client_loss():
    """The round's update is a descent direction: the client's loss on its first batch falls (float reference
    of the updated model, no quantization involved)."""
    cfg = RunConfig(workload="toy", strategy="fedavg", algorithm="fedavg", bits=8, granularity="channel",
                    local_steps=4, lr=0.1, num_clients=3, clients_per_round=3, rounds=1, seed=0)
    wl = ToyWorkload(cfg)
    res = client_round(wl, build_client_model(wl, cfg), cfg, client_id=2, round_num=1)
    net = wl.build_model()
    x, y = wl.client_batches(2, 1, 1, 2)[0]
    with torch.no_grad():
        before = float(F.cross_entropy(net(x), y))
    with torch.no_grad():
        for k, p in net.state_dict().items():
            p.add_(res.update[k].to(p.dtype))
        after = float(F.cross_entropy(net(x), y))
    assert after < before - 1e-3, (before, after)
