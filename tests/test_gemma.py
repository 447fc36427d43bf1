"""Gemma parity with transformers on tiny random configs: logits, padding, cache, greedy decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaForCausalLM, GemmaForSequenceClassification, GemmaForTokenClassification

import lmtool
from lmtool import kernels
from lmtool.config import ModelConfig
from lmtool.errors import ConfigError
from lmtool.families.gemma.config import GemmaConfig
from lmtool.generation import SamplingParams, generate

from helpers import assert_captured_step_matches_layers, cached_vs_full, padded_batch, randomize, save_hf, tiny_gemma_config

# MHA, MQA (as gemma-2b), GQA, and a head_dim unrelated to hidden/heads (as gemma-7b).
SHAPES = {
    "mha": dict(num_key_value_heads=4, head_dim=8),
    "mqa": dict(num_key_value_heads=1, head_dim=16),
    "gqa-wide-head": dict(num_key_value_heads=2, head_dim=12),
}
FP32_TOL = 1e-4


@pytest.fixture(scope="module", params=list(SHAPES))
def causal_pair(request, tmp_path_factory):
    torch.manual_seed(1)
    hf = randomize(GemmaForCausalLM(tiny_gemma_config(**SHAPES[request.param])))
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, lmtool.load(folder, dtype="float32", device="cpu")


def test_logits_match_transformers(causal_pair):
    hf, lm = causal_pair
    ids = torch.randint(3, 120, (2, 11))
    with torch.no_grad():
        diff = (hf(ids).logits - lm.model(ids)).abs().max().item()
    assert diff <= FP32_TOL


def test_left_padded_batch_matches_transformers_and_single_rows(causal_pair):
    hf, lm = causal_pair
    ids, mask = padded_batch(120)
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (ours - theirs)[real].abs().max().item() <= FP32_TOL
        for row in range(ids.shape[0]):
            alone = lm.model(ids[row : row + 1][:, real[row]])
            assert (alone[0] - ours[row, real[row]]).abs().max().item() <= FP32_TOL


def test_cached_decode_matches_full_forward(causal_pair):
    _, lm = causal_pair
    ids, mask = padded_batch(120, lengths=(10, 7))
    assert cached_vs_full(lm.model, ids, mask) <= FP32_TOL


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_greedy_generation_identical_to_transformers(causal_pair):
    hf, lm = causal_pair
    ids, mask = padded_batch(120, lengths=(7, 4))
    prompts = [ids[r, mask[r].bool()].tolist() for r in range(2)]
    with torch.no_grad():
        expected = hf.generate(
            ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=1
        )[:, ids.shape[1] :]
    batched, _ = generate(
        lm.model, prompts, max_new_tokens=32, params=SamplingParams(temperature=0), seed=0, eos_ids=[1]
    )
    for row, prompt in enumerate(prompts):
        want = _until_eos(expected[row].tolist(), 1)
        alone, _ = generate(
            lm.model, [prompt], max_new_tokens=32, params=SamplingParams(temperature=0), seed=0, eos_ids=[1]
        )
        assert batched[row].token_ids == want
        assert alone[0].token_ids == want
    assert len(expected[0]) == 32


@pytest.mark.parametrize("head_cls, task", [
    (GemmaForSequenceClassification, "sequence-classification"),
    (GemmaForTokenClassification, "token-classification"),
])
def test_classification_heads_match_transformers(tmp_path, head_cls, task):
    config = tiny_gemma_config(num_key_value_heads=1, head_dim=16, id2label={0: "neg", 1: "neu", 2: "pos"})
    hf = randomize(head_cls(config))
    save_hf(hf, tmp_path)
    lm = lmtool.load(tmp_path, dtype="float32")
    assert lm.task == task  # picked from config.json's architectures
    ids, mask = padded_batch(120)
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask).logits
    if task == "token-classification":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= FP32_TOL


def test_bfloat16_close_to_transformers(tmp_path):
    torch.manual_seed(3)
    hf = randomize(GemmaForCausalLM(tiny_gemma_config(num_key_value_heads=1, head_dim=16)), std=0.1)
    save_hf(hf, tmp_path)
    hf = hf.to(torch.bfloat16)
    lm = lmtool.load(tmp_path, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    ids = torch.randint(3, 120, (2, 12))
    with torch.no_grad():
        ours, theirs = lm.model(ids).float(), hf(ids).logits.float()
    # A few bf16 ulps of the logit scale: the rounding steps are the same, the kernels are not.
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 0.02 * max(scale, 1.0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95


def test_legacy_gelu_means_tanh_and_hidden_activation_wins():
    assert GemmaConfig.from_dict({"hidden_act": "gelu"}).activation == "gelu_pytorch_tanh"
    config = GemmaConfig.from_dict({"hidden_act": "gelu", "hidden_activation": "gelu"})
    assert config.activation == "gelu"


def test_config_round_trip_keeps_unknown_keys_and_rejects_bad_values():
    data = {"model_type": "gemma", "hidden_size": 64, "my_custom_key": [1, 2], "torch_dtype": "bfloat16"}
    config = GemmaConfig.from_dict(data)
    written = config.to_dict()
    assert written["my_custom_key"] == [1, 2]
    assert written["dtype"] == "bfloat16" and written["hidden_size"] == 64
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        GemmaConfig.from_dict({"num_attention_heads": 4, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="'hidden_size' should be int"):
        GemmaConfig.from_dict({"hidden_size": "big"})
    assert isinstance(config, ModelConfig)


@pytest.mark.skipif(not kernels.available(), reason="no native kernels here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weights", ["dense", "int8", "int4"])
def test_captured_decode_step_gives_exactly_what_the_layers_give(tmp_path, monkeypatch, dtype, weights):
    """The DecodePlan (decode.py) makes the layers' kernel calls on the same values: the same
    logits to the bit on a left-padded batch (the mask, rows at different positions), for dense
    weights (q/k/v and gate/up fused) and int8 / int4 ones (a call per part)."""
    from lmtool.families.gemma.model import GemmaModel

    torch.manual_seed(4)
    folder = save_hf(randomize(GemmaForCausalLM(tiny_gemma_config(
        num_key_value_heads=2, head_dim=16, hidden_size=64, intermediate_size=128))), tmp_path / "dense")
    ids, mask = padded_batch(120, lengths=(10, 7))
    assert_captured_step_matches_layers(folder, dtype, weights, ids, mask, GemmaModel, monkeypatch)
