"""Spec §2.6 FedAvg re-quantization invariants on the client (spec §2.2 step 4).

After every local step each quantized layer holds integer codes with |q| <= t_b, the max-abs code at exactly t_b
(fresh max-abs scale), and the round's update of a quantized tensor is s_T q_T - s_0 q_0.
"""

import pytest
import torch

from fedaqt.client.trainer import build_client_model, client_round
from fedaqt.config import RunConfig
from fedaqt.quant.convert import quant_layers
from fedaqt.quant.layers import QuantLayer
from fedaqt.quant.quantize import dequantize, qmax
from toy import ToyWorkload


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_requantized_after_every_local_step(monkeypatch, bits, granularity):
    torch.set_num_threads(1)
    cfg = RunConfig(workload="toy", strategy="fedavg", algorithm="fedavg", bits=bits, granularity=granularity,
                    local_steps=4, lr=0.5, num_clients=3, clients_per_round=3, rounds=1, seed=0)
    wl = ToyWorkload(cfg)
    model = build_client_model(wl, cfg)
    layers = quant_layers(model)
    start = {k: dequantize(l.codes.clone(), l.scale.clone()) for k, l in layers.items()}
    seen: dict[str, list] = {k: [] for k in layers}
    original = QuantLayer.requantize_

    def recording(self, w):
        out = original(self, w)
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
