"""BLOOM parity with transformers on tiny random configs: every head, left padding, the cache,
greedy decoding, checkpoints in both directions, ALiBi slopes, config aliases and the tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BloomConfig as HFBloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel as HFBloomModel,
    PreTrainedTokenizerFast,
)
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

import helpers
import lmtool
from lmtool.checkpoint import PlannedTensor, write_weights
from lmtool.errors import CheckpointError, ConfigError
from lmtool.families.bloom.config import BloomConfig
from lmtool.cache import ModelCache, uncached_step
from lmtool import kernels
from lmtool.families.bloom.model import BloomModel, alibi_bias, alibi_slopes
from lmtool.generation import SamplingParams, generate
from lmtool.loading import build_model
from lmtool.registry import get_family
from lmtool.tokenizer import Tokenizer as LmTokenizer

from helpers import TEXT, cached_vs_full, randomize, save_hf

FP32_TOL = 1e-4
VOCAB, PAD = 150, 3
# A power-of-two head count, a count that is not one (6: extra ALiBi slopes) with the residual
# taken after the LayerNorm, and 5 heads with slow_but_exact over pretraining_tp=2.
SHAPES = {
    "h4": dict(hidden_size=32, n_head=4),
    "h6-post-ln": dict(hidden_size=48, n_head=6, apply_residual_connection_post_layernorm=True),
    "h5-slow-exact": dict(hidden_size=40, n_head=5, slow_but_exact=True, pretraining_tp=2),
}
HEADS = {
    "causal-lm": BloomForCausalLM,
    "sequence-classification": BloomForSequenceClassification,
    "token-classification": BloomForTokenClassification,
    "question-answering": BloomForQuestionAnswering,
}


def tiny_config(**overrides) -> HFBloomConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=PAD,
                  bos_token_id=1, eos_token_id=2, id2label={0: "a", 1: "b", 2: "c"})
    values.update(overrides)
    return HFBloomConfig(**values)


def padded_batch(lengths=(9, 6, 3)):
    return helpers.padded_batch(VOCAB, lengths, pad=PAD, first_id=4)


def real_positions(task, out, mask):
    """The outputs at real tokens (all of them for sequence classification)."""
    if task == "sequence-classification":
        return out
    if task == "question-answering":
        return torch.stack([o[mask.bool()] for o in out])
    return out[mask.bool()]


def hf_outputs(task, output):
    return (output.start_logits, output.end_logits) if task == "question-answering" else output.logits


@pytest.fixture(scope="module", params=list(SHAPES))
def causal_pair(request, tmp_path_factory):
    torch.manual_seed(1)
    hf = randomize(BloomForCausalLM(tiny_config(**SHAPES[request.param])))
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, lmtool.load(folder, dtype="float32", device="cpu")


# --- forward parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("task", list(HEADS))
def test_every_head_matches_transformers_on_a_left_padded_batch(tmp_path, task, shape):
    hf = randomize(HEADS[task](tiny_config(**SHAPES[shape])))
    save_hf(hf, tmp_path)
    lm = lmtool.load(tmp_path, dtype="float32", device="cpu")
    assert lm.task == task  # from config.json's architectures
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = real_positions(task, lm.model(ids, attention_mask=mask), mask)
        theirs = real_positions(task, hf_outputs(task, hf(ids, attention_mask=mask)), mask)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= FP32_TOL


def test_left_padding_gives_the_unpadded_result(causal_pair):
    hf, lm = causal_pair
    ids, mask = padded_batch()
    with torch.no_grad():
        batch = lm.model(ids, attention_mask=mask)
        assert torch.isfinite(batch).all()  # pad rows are never fully masked
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = lm.model(ids[row : row + 1, real])
            assert (alone[0] - batch[row, real]).abs().max().item() <= FP32_TOL
            theirs = hf(ids[row : row + 1, real]).logits
            assert (alone - theirs).abs().max().item() <= FP32_TOL


def test_cached_decode_matches_full_forward(causal_pair):
    _, lm = causal_pair
    ids, mask = padded_batch(lengths=(10, 7))
    assert cached_vs_full(lm.model, ids, mask) <= FP32_TOL


def test_greedy_generation_identical_to_transformers(causal_pair):
    hf, lm = causal_pair
    ids, mask = padded_batch(lengths=(7, 4))
    prompts = [ids[r, mask[r].bool()].tolist() for r in range(2)]
    greedy = SamplingParams(temperature=0)
    with torch.no_grad():
        expected = hf.generate(
            ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=PAD, eos_token_id=None
        )[:, ids.shape[1] :]
    assert expected.shape[1] == 32
    batched, _ = generate(lm.model, prompts, max_new_tokens=32, params=greedy, seed=0, eos_ids=[], pad_id=PAD)
    for row, prompt in enumerate(prompts):
        alone, _ = generate(lm.model, [prompt], max_new_tokens=32, params=greedy, seed=0, eos_ids=[])
        assert batched[row].token_ids == expected[row].tolist()
        assert alone[0].token_ids == expected[row].tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_follows_transformers_rounding(tmp_path, dtype):
    hf = randomize(BloomForCausalLM(tiny_config(hidden_size=48, n_head=6)), std=0.1)
    save_hf(hf, tmp_path)
    hf = hf.to(getattr(torch, dtype))
    lm = lmtool.load(tmp_path, dtype=dtype, device="cpu")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)[mask.bool()].float()
        theirs = hf(ids, attention_mask=mask).logits[mask.bool()].float()
    # Same rounding steps (ALiBi cast to the model dtype, fp32 softmax): equal on CPU in practice.
    assert (ours - theirs).abs().max().item() <= 1e-2 * theirs.abs().max().item()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_decoding_runs_far_past_the_prompt_with_no_position_table(causal_pair):
    _, lm = causal_pair
    cache = lm.model.make_cache(1, 300)
    ids = torch.randint(4, VOCAB, (1, 300))
    with torch.no_grad():
        full = lm.model(ids)[:, -1]
        lm.model(ids[:, :-1], cache=cache)
        last = lm.model(ids[:, -1:], cache=cache)[:, -1]
    assert (last - full).abs().max().item() <= FP32_TOL


# --- checkpoints ---------------------------------------------------------------------------------


def test_hub_checkpoint_without_the_transformer_prefix_loads(tmp_path):
    hf = randomize(BloomForCausalLM(tiny_config()))
    base = HFBloomModel(hf.config)
    base.load_state_dict(hf.transformer.state_dict())
    base.save_pretrained(tmp_path)  # keys: word_embeddings.weight, h.0...., no prefix
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BloomForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    lm = lmtool.load(tmp_path, dtype="float32", device="cpu")
    ids = torch.randint(4, VOCAB, (2, 8))
    with torch.no_grad():
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("task", list(HEADS))
def test_our_checkpoints_load_unchanged_in_transformers(tmp_path, task):
    family = get_family("bloom")
    config = BloomConfig.from_dict(tiny_config(n_head=6, hidden_size=36).to_dict())
    config.architectures = [family.architecture(task)]
    ours = randomize(build_model(family, config, task))
    state = ours.checkpoint_state_dict()
    write_weights(tmp_path, [PlannedTensor(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state.items()])
    (tmp_path / "config.json").write_text(config.to_json())
    theirs, info = HEADS[task].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch()
    with torch.no_grad():
        a = real_positions(task, ours(ids, attention_mask=mask), mask)
        b = real_positions(task, hf_outputs(task, theirs.eval()(ids, attention_mask=mask)), mask)
    assert (a - b).abs().max().item() <= FP32_TOL


def test_a_checkpoint_with_the_wrong_head_count_is_refused(tmp_path):
    save_hf(randomize(BloomForCausalLM(tiny_config())), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 36
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="word_embeddings.weight' has shape"):
        lmtool.load(tmp_path)


# --- ALiBi and config ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 32, 112])
def test_alibi_slopes_equal_transformers_bit_for_bit(heads):
    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_alibi_key_positions_come_from_the_mask_with_and_without_a_cache():
    # Softmax hides a per-row shift of the bias, so check the bias itself, bit for bit.
    _, mask = padded_batch(lengths=(7, 4, 1))
    slopes = alibi_slopes(6)
    step = uncached_step(mask, 3, 7, mask.device)
    expected = build_alibi_tensor(mask, 6, torch.float16)
    assert torch.equal(alibi_bias(slopes, step, torch.float16), expected)
    cache = ModelCache([], 3, 9, mask.device)
    cache.begin(mask, 7)
    decode = cache.begin(None, 1)  # a decode step sees the prompt's padding through the cache
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    assert torch.equal(alibi_bias(slopes, decode, torch.float32), build_alibi_tensor(full_mask, 6, torch.float32))


def test_config_aliases_and_validation():
    config = BloomConfig.from_dict({"n_embed": 64, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 8})
    assert (config.hidden_size, config.n_layer, config.n_head, config.head_dim) == (64, 3, 8, 8)
    written = config.to_dict()
    assert written["n_layer"] == 3 and written["n_head"] == 8 and "n_embed" not in written
    with pytest.raises(ConfigError, match="hidden_size \\(30\\) must be a multiple of n_head \\(4\\)"):
        BloomConfig.from_dict({"hidden_size": 30, "n_head": 4}, source="x/config.json")
    with pytest.raises(ConfigError, match="x/config.json: 'n_layer' should be int"):
        BloomConfig.from_dict({"n_layer": "two"}, source="x/config.json")


# --- tokenizer -----------------------------------------------------------------------------------


def bloom_style_tokenizer(folder):
    """A small byte-level BPE with BLOOM's special tokens <unk>, <s>, </s>, <pad> = 0..3."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BloomTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "<pad>", "padding_side": "left",
    }))
    return folder


def test_tokenizer_byte_level_no_bos_and_special_ids_from_files(tmp_path):
    folder = bloom_style_tokenizer(tmp_path)
    tok = LmTokenizer.from_folder(folder, family=get_family("bloom"), config=BloomConfig())
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (1, [2], 3, False)
    theirs = PreTrainedTokenizerFast.from_pretrained(folder)
    for text in TEXT + ["  spaces\tand\nnew lines ", "émoji 🙂 and 中文"]:
        ids = tok.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: every string round-trips
    ids, mask = tok.batch_encode(["The fox", "The quick brown fox"])
    assert ids[0, 0].item() == 3 and mask[0, 0].item() == 0  # left-padded with <pad>


@pytest.mark.skipif(not kernels.available(), reason="no native kernels here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,weights", [("h4", "dense"), ("h6-post-ln", "dense"), ("h4", "int8"), ("h4", "int4")])
def test_captured_decode_step_gives_exactly_what_the_layers_give(tmp_path, monkeypatch, dtype, shape, weights):
    """The DecodePlan (decode.py) makes the layers' kernel calls on the same values: the same
    logits to the bit, on a left-padded batch (the mask), with the residual after the norm, and
    with int8 / int4 weights (their biases added after the product)."""
    torch.manual_seed(3)
    folder = save_hf(randomize(BloomForCausalLM(tiny_config(**SHAPES[shape]))), tmp_path / "dense")
    ids, mask = padded_batch(lengths=(10, 7))
    helpers.assert_captured_step_matches_layers(folder, dtype, weights, ids, mask, BloomModel, monkeypatch)
