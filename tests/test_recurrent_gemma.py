"""RecurrentGemma parity: transformers within the attention window, the authors' Griffin past it,
on tiny random configs; left padding, chunked prefill, cached decode, heads, greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import RecurrentGemmaConfig as HFConfig
from transformers import RecurrentGemmaForCausalLM
from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaPreTrainedModel

import lmtool
from lmtool.errors import ConfigError
from lmtool.families.recurrent_gemma.config import RecurrentGemmaConfig
from lmtool.generation import SamplingParams, generate
from lmtool.recurrent import causal_conv1d, linear_scan

from griffin_oracle import griffin_from_hf, griffin_greedy, griffin_logits
from helpers import generic_head_classes, name_architecture, padded_batch, randomize

WINDOW = 8
FP32_TOL = 1e-4
VOCAB = 120
# The authors' attention is MQA only; transformers also takes GQA and other block patterns.
SHAPES = {
    "mqa-conv4": dict(num_key_value_heads=1, conv1d_width=4, num_hidden_layers=5),
    "gqa-conv3-ar": dict(num_key_value_heads=2, conv1d_width=3, num_hidden_layers=4, block_types=["attention", "recurrent"]),
    "mha-rar": dict(num_key_value_heads=4, conv1d_width=4, num_hidden_layers=3, block_types=["recurrent", "attention", "recurrent"]),
}


def tiny_config(**overrides) -> HFConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=48, attention_window_size=WINDOW, conv1d_width=4,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    values.update(overrides)
    return HFConfig(**values)


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    torch.manual_seed(7)
    hf = randomize(RecurrentGemmaForCausalLM(tiny_config(**SHAPES[request.param])), std=0.2)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, lmtool.load(folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """An MQA model with the authors' Griffin holding the same weights."""
    torch.manual_seed(11)
    hf = randomize(RecurrentGemmaForCausalLM(tiny_config(num_hidden_layers=5)), std=0.2)
    folder = tmp_path_factory.mktemp("authors")
    hf.save_pretrained(folder)
    return hf, griffin_from_hf(hf), lmtool.load(folder, dtype="float32", device="cpu")


def test_within_window_matches_transformers(pair):
    _, hf, lm = pair
    ids = torch.randint(3, VOCAB, (2, WINDOW))
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - lm.model(ids)).abs().max().item()
    assert diff <= FP32_TOL


def test_past_window_matches_transformers_with_one_more_key(pair, tmp_path):
    """transformers' window of W+1 keys is the authors' window W: with that, transformers is an
    oracle past the window for the shapes the authors' code does not have (GQA, MHA)."""
    _, hf, lm = pair
    wider = RecurrentGemmaForCausalLM(tiny_config(**{**SHAPES[pair[0]], "attention_window_size": WINDOW + 1}))
    wider.load_state_dict(hf.state_dict())
    ids = torch.randint(3, VOCAB, (2, 3 * WINDOW + 3))
    with torch.no_grad():
        diff = (wider.eval()(ids, use_cache=False).logits - lm.model(ids)).abs().max().item()
    assert diff <= FP32_TOL


def test_past_window_matches_the_authors_and_not_transformers(authors):
    hf, griffin, lm = authors
    ids = torch.randint(3, VOCAB, (2, 3 * WINDOW + 1))
    with torch.no_grad():
        ours, theirs = lm.model(ids), griffin_logits(griffin, ids)
        transformers_ = hf(ids, use_cache=False).logits
    assert (ours - theirs).abs().max().item() <= FP32_TOL
    # transformers agrees before position `window` and not from it on (one key fewer).
    per_position = (transformers_ - theirs).abs().amax(dim=(0, 2))
    assert per_position[:WINDOW].max() <= FP32_TOL
    assert per_position[WINDOW] > 1e-3


def test_left_padded_rows_equal_rows_alone_and_the_authors(authors):
    _, griffin, lm = authors
    ids, mask = padded_batch(VOCAB, (20, 13, 5))
    real = mask.bool()
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        theirs = griffin_logits(griffin, ids, mask)
        assert (ours - theirs)[real].abs().max().item() <= FP32_TOL
        for row in range(ids.shape[0]):
            alone = lm.model(ids[row : row + 1][:, real[row]])
            assert (alone[0] - ours[row, real[row]]).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("chunks", [(5, 7, 1, 11, 1, 1), (1,) * 26, (3, 23), (9, 9, 8)])
def test_chunked_and_cached_equal_one_shot(pair, chunks):
    """Prefill in chunks (odd sizes, across window boundaries), then single tokens, left padded:
    every real position equals the full forward."""
    _, _, lm = pair
    width = sum(chunks)
    ids, mask = padded_batch(VOCAB, (width, width - 4, width - 11))
    with torch.no_grad():
        full = lm.model(ids, attention_mask=mask)
        cache = lm.model.make_cache(ids.shape[0], width)
        outs, start = [], 0
        for n in chunks:
            piece = slice(start, start + n)
            # Decode steps pass no mask once the prompt is in, as generate does.
            step_mask = mask[:, piece] if start < width - 11 else None
            outs.append(lm.model(ids[:, piece], attention_mask=step_mask, cache=cache))
            start += n
    cached = torch.cat(outs, dim=1)
    assert (cached - full)[mask.bool()].abs().max().item() <= FP32_TOL


def test_decoding_state_is_constant_in_length(authors):
    _, _, lm = authors
    cache = lm.model.make_cache(1, 200)
    sizes = []
    with torch.no_grad():
        for new_tokens in (30, 30, 1, 40):  # 30, 60, 61 and 101 tokens in all
            lm.model(torch.randint(3, VOCAB, (1, new_tokens)), cache=cache)
            sizes.append(sum(t.numel() for layer in cache.layers for t in _tensors(layer)))
    assert len(set(sizes)) == 1


def _tensors(layer):
    if hasattr(layer, "tensors"):
        return list(layer.tensors.values())
    return [layer.keys, layer.values]


def _until_eos(tokens, eos=1):
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_greedy_equals_transformers_within_and_the_authors_past_the_window(authors):
    hf, griffin, lm = authors
    prompts = [[2, 17, 33, 4, 91], [2, 5, 6]]
    greedy = SamplingParams(temperature=0)
    # Within the window transformers' greedy is the reference.
    ids, mask = padded_batch(VOCAB, (5, 3))
    for row, prompt in enumerate(prompts):
        ids[row, ids.shape[1] - len(prompt) :] = torch.tensor(prompt)
    short = WINDOW - 5
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=short, do_sample=False, eos_token_id=1, pad_token_id=0)
    ours, _ = generate(lm.model, [prompts[0]], max_new_tokens=short, params=greedy, seed=0, eos_ids=[1])
    assert ours[0].token_ids == _until_eos(expected[0, 5:].tolist())
    # Several windows long, batched (left padding) and alone, with a chunked prefill.
    batched, _ = generate(lm.model, prompts, max_new_tokens=3 * WINDOW, params=greedy, seed=0, eos_ids=[], prefill_chunk=2)
    for row, prompt in enumerate(prompts):
        want = griffin_greedy(griffin, prompt, 3 * WINDOW)
        alone, _ = generate(lm.model, [prompt], max_new_tokens=3 * WINDOW, params=greedy, seed=0, eos_ids=[])
        assert alone[0].token_ids == want
        assert batched[row].token_ids == want


HEADS = generic_head_classes(RecurrentGemmaPreTrainedModel)


@pytest.mark.parametrize("task", list(HEADS))
def test_task_heads_follow_transformers_generic_conventions(tmp_path, task):
    """Checkpoints saved by transformers' generic head classes over RecurrentGemma load, and give
    the head applied to transformers' backbone output (pooled at the last non-pad token)."""
    config = tiny_config(num_hidden_layers=4, id2label={0: "neg", 1: "neu", 2: "pos"})
    hf = randomize(HEADS[task](config))
    hf.save_pretrained(tmp_path)
    # transformers has no such classes for this family: name them as it names Gemma's.
    name_architecture(tmp_path, "RecurrentGemma", task)
    lm = lmtool.load(tmp_path, dtype="float32")
    assert lm.task == task
    ids = torch.randint(3, VOCAB, (2, WINDOW))
    ids[1, -2:] = 0  # right padding: pooling takes the last non-pad token
    with torch.no_grad():
        hidden = hf.model(ids, use_cache=False).last_hidden_state
        head = getattr(hf, "qa_outputs", None) or hf.score
        expected = head(hidden)
        if task == "sequence-classification":
            last = (torch.arange(ids.shape[1]) * (ids != 0)).argmax(-1)
            expected = expected[torch.arange(2), last]
            ours = lm.model(ids)
        elif task == "token-classification":
            ours = lm.model(ids)
        else:
            ours = torch.stack(lm.model(ids), dim=-1)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= FP32_TOL


def test_bfloat16_close_to_transformers(tmp_path):
    torch.manual_seed(3)
    hf = randomize(RecurrentGemmaForCausalLM(tiny_config(num_hidden_layers=4)), std=0.1)
    hf.save_pretrained(tmp_path)
    hf = hf.to(torch.bfloat16)
    lm = lmtool.load(tmp_path, dtype="bfloat16")
    ids = torch.randint(3, VOCAB, (2, WINDOW))
    with torch.no_grad():
        ours, theirs = lm.model(ids).float(), hf(ids, use_cache=False).logits.float()
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 0.02 * max(scale, 1.0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9


def test_config_reads_hub_and_legacy_keys_and_keeps_unknown_ones():
    config = RecurrentGemmaConfig.from_dict({
        "_block_types": ["recurrent", "attention"], "num_hidden_layers": 5, "hidden_size": 64,
        "num_attention_heads": 4, "partial_rotary_factor": 0.25, "head_dim": 999, "my_key": 1,
        "embeddings_scale_by_sqrt_dim": True,
    })
    assert config.layer_types == ["recurrent", "attention", "recurrent", "attention", "recurrent"]
    assert config.head_dim == 16 and config.rotary_dim == 4 and config.kv_heads == 4
    assert config.recurrent_width == 64
    written = config.to_dict()
    assert written["block_types"] == ["recurrent", "attention"] and written["my_key"] == 1
    assert "head_dim" not in written
    nested = RecurrentGemmaConfig.from_dict({"rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 1.0}})
    assert nested.rotary_fraction == 1.0 and nested.rope_base == 500.0
    assert RecurrentGemmaConfig.from_dict({}).layer_types[:3] == ["recurrent", "recurrent", "attention"]
    with pytest.raises(ConfigError, match="block_types"):
        RecurrentGemmaConfig.from_dict({"block_types": ["recurrent", "mamba"]})
    with pytest.raises(ConfigError, match="lru_width"):
        RecurrentGemmaConfig.from_dict({"lru_width": 30, "num_attention_heads": 4, "hidden_size": 64})
    assert RecurrentGemmaConfig.from_dict({"logits_soft_cap": 0}).soft_cap is None


def test_transformers_loads_what_lmtool_reads(tmp_path):
    """The config lmtool writes back loads in transformers to the same architecture."""
    data = tiny_config(num_hidden_layers=4, block_types=["attention", "recurrent"]).to_dict()
    config = RecurrentGemmaConfig.from_dict(data)
    (tmp_path / "config.json").write_text(config.to_json())
    again = HFConfig.from_pretrained(tmp_path)
    assert list(again.block_types) == ["attention", "recurrent"]
    assert again.attention_window_size == WINDOW and again.conv1d_width == 4


def test_linear_scan_matches_a_loop_and_resets_exactly():
    torch.manual_seed(0)
    a = torch.rand(2, 37, 5)
    a[0, 10] = 0.0  # a reset
    x = torch.randn(2, 37, 5)
    h0 = torch.randn(2, 5)
    h, last = linear_scan(a, x, h0)
    state, expected = h0.clone(), []
    for t in range(37):
        state = a[:, t] * state + x[:, t]
        expected.append(state)
    expected = torch.stack(expected, dim=1)
    assert (h - expected).abs().max() <= 1e-5 and torch.equal(last, h[:, -1])
    # After the reset the first row no longer depends on anything before it.
    h2, _ = linear_scan(a, torch.cat([torch.randn(2, 10, 5), x[:, 10:]], dim=1), torch.randn(2, 5))
    assert torch.allclose(h2[0, 10:], h[0, 10:], atol=1e-6)


def test_causal_conv_continues_its_state_and_equals_torch_conv():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 9, 3), torch.randn(3, 4), torch.randn(3)
    whole, _ = causal_conv1d(x, w, b, None)
    reference = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=3, groups=3)[..., :9]
    assert torch.allclose(whole, reference.transpose(1, 2), atol=1e-5)
    # In pieces (several steps, then one at a time), each continuing the state.
    first, state = causal_conv1d(x[:, :5], w, b, None)
    pieces = [first]
    for t in range(5, 9):
        y, state = causal_conv1d(x[:, t : t + 1], w, b, state)
        pieces.append(y)
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-5)
    assert torch.equal(state, x[:, -3:])



def test_inspect_shows_the_block_pattern_and_the_true_decoding_state(pair, capsys):
    """The state size inspect reports is what make_cache allocates (float32 model: 4 bytes)."""
    from helpers import run_cli

    name, _, lm = pair
    code, out, err = run_cli(capsys, "inspect", str(lm.path), "--json")
    assert code == 0, err
    structure = json.loads(out)["structure"]
    cache = lm.model.make_cache(1, 64)
    with torch.no_grad():
        lm.model(torch.randint(3, VOCAB, (1, 3 * WINDOW)), cache=cache)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in _tensors(layer))
    assert structure["decoding state per sequence"] == allocated
    pattern = SHAPES[name].get("block_types", ["recurrent", "recurrent", "attention"])
    assert structure["block pattern"].startswith(", ".join(pattern))
    assert f"window {WINDOW}" in structure["attention"]
