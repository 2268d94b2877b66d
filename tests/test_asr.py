"""ASR workload pieces: CTC greedy decoding, WER/CER, features, model, broadcast payload sizes (issue 2)."""

import math

import pytest
import torch

from fedaqt.config import RunConfig
from fedaqt.models.conformer_asr import ConformerCTC, is_encoder_matrix
from fedaqt.quant.convert import convert_to_quantized, model_gradients, quant_layers, quantized_weight_keys
from fedaqt.quant.wire import encode_broadcast, record_nbytes
from fedaqt.workloads.asr import BLANK, VOCAB, ctc_greedy_decode, encode_text, wer_cer

torch.set_num_threads(1)


def _log_probs(frames: list[int]) -> torch.Tensor:
    lp = torch.full((1, len(frames), len(VOCAB)), -10.0)
    for t, i in enumerate(frames):
        lp[0, t, i] = 0.0
    return lp


def test_ctc_greedy_decode_known_path():
    # "HELLO WORLD" with repeats and blanks: H H _ E L L _ L O _ ' ' W O R L _ D D
    ids = [VOCAB.index(c) for c in "HELLO WORLD"]
    path = [ids[0], ids[0], BLANK, ids[1], ids[2], ids[2], BLANK, ids[3], ids[4], BLANK, ids[5],
            ids[6], ids[7], ids[8], ids[9], BLANK, ids[10], ids[10]]
    assert ctc_greedy_decode(_log_probs(path), torch.tensor([len(path)])) == ["HELLO WORLD"]
    # lengths cut the path: only the first 5 frames count
    assert ctc_greedy_decode(_log_probs(path), torch.tensor([5])) == ["HEL"]


def test_wer_cer_known_values():
    wer, cer = wer_cer(["THE CAT SAT", "A B"], ["THE CAT SAT", "A B"])
    assert wer == 0.0 and cer == 0.0
    # one substitution out of 3 words; "SIT" vs "SAT": 1 char out of 11
    wer, cer = wer_cer(["THE CAT SAT"], ["THE CAT SIT"])
    assert wer == pytest.approx(1 / 3) and cer == pytest.approx(1 / 11)
    # an empty hypothesis deletes everything
    wer, cer = wer_cer(["TO BE"], [""])
    assert wer == 1.0 and cer == 1.0


def test_encode_text_maps_charset():
    assert encode_text("to be, or not!") == [VOCAB.index(c) for c in "TO BE OR NOT"]
    assert BLANK not in encode_text("A Z '")


def test_quantized_layers_hold_no_float_weights_and_head_stays_float():
    model = ConformerCTC(80, len(VOCAB), size="tiny")
    qmodel = convert_to_quantized(model, 8, "tensor", is_encoder_matrix)
    layers = quant_layers(qmodel)
    assert "head.weight" not in layers and "frontend.weight" in layers
    for key, layer in layers.items():
        assert layer.codes.dtype == torch.int8, key
        for name, t in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
            if t.is_floating_point():
                assert t.dim() <= 1, f"{key}: float tensor {name} of shape {tuple(t.shape)}"
    # every remaining >1-D float parameter is the float CTC head
    big_float = [n for n, p in qmodel.named_parameters() if p.dim() > 1]
    assert big_float == ["head.weight"]


def test_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = ConformerCTC(80, len(VOCAB), size="tiny", dropout=0.0)
    qmodel = convert_to_quantized(model, 8, "tensor", is_encoder_matrix)
    feats = torch.randn(2, 60, 80)
    lengths = torch.tensor([60, 44])
    grads = []
    for ckpt in (False, True):
        qmodel.checkpointing = ckpt
        qmodel.train()
        for p in qmodel.parameters():
            p.grad = None
        for layer in quant_layers(qmodel).values():
            layer.zero_weight_grad()
        lp, _ = qmodel(feats, lengths)
        lp.sum().backward()
        grads.append(model_gradients(qmodel))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_broadcast_bytes_ratio_int8_int4():
    """Must-show 2: bytes_down int8 <= 0.27x and int4 <= 0.15x of float32 for the default model."""
    model = ConformerCTC(80, len(VOCAB), size="tiny")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    qkeys = quantized_weight_keys(model, is_encoder_matrix)
    sizes = {}
    for bits in (32, 8, 4):
        arrays, meta = encode_broadcast(state, qkeys if bits < 32 else [], bits, "tensor")
        sizes[bits] = record_nbytes(arrays)
        dtypes = {arrays[k].numpy().dtype.name for k in qkeys}
        if bits == 8:
            assert dtypes == {"int8"}
        elif bits == 4:
            assert dtypes == {"uint8"}
        for k in state:
            if k not in qkeys:
                assert arrays[k].numpy().dtype.name == "float32"
    assert sizes[8] / sizes[32] <= 0.27
    assert sizes[4] / sizes[32] <= 0.15


def test_missing_data_dir_says_how_to_build(tmp_path):
    from fedaqt.workloads.asr import ASRWorkload

    w = ASRWorkload(RunConfig(options={"data_dir": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match="fedaqt data speech"):
        w.prepare()


@pytest.mark.parametrize("bits", [32, 4])
def test_sublayer_checkpointing_equals_torchaudio_forward_with_dropout(bits):
    """Sub-module checkpoint segments (the default granularity) recompute torchaudio's own ConformerLayer.forward:
    same log-probabilities and bitwise-equal gradients as no checkpointing (torchaudio's forward, the reference)
    and as one segment per block, with dropout on (each segment replays its RNG state)."""
    torch.manual_seed(0)
    model = ConformerCTC(80, len(VOCAB), size="tiny", dropout=0.1)
    if bits < 32:
        model = convert_to_quantized(model, bits, "tensor", is_encoder_matrix)
    feats = torch.randn(2, 60, 80)
    lengths = torch.tensor([60, 44])
    outs, grads = [], []
    for ckpt, gran in ((False, "sublayer"), (True, "layer"), (True, "sublayer")):
        model.checkpointing, model.checkpoint_granularity = ckpt, gran
        model.train()
        for p in model.parameters():
            p.grad = None
        for layer in quant_layers(model).values():
            layer.zero_weight_grad()
        torch.manual_seed(123)
        lp, _ = model(feats, lengths)
        lp.sum().backward()
        outs.append(lp.detach())
        grads.append(model_gradients(model))
    for i in (1, 2):
        assert torch.equal(outs[0], outs[i])
        assert grads[0].keys() == grads[i].keys()
        for k in grads[0]:
            assert torch.equal(grads[0][k], grads[i][k]), (i, k)
