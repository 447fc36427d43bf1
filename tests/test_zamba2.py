"""Zamba2 parity with transformers 5.23 (its pure-PyTorch path) on tiny random configs: logits,
left padding, chunked prefill and decode, greedy decoding, heads, bfloat16, config, state dict,
decoding state, and a Mistral-style SentencePiece tokenizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Zamba2Config as HFConfig
from transformers import Zamba2ForCausalLM, Zamba2ForSequenceClassification
from transformers.models.zamba2.modeling_zamba2 import Zamba2PreTrainedModel

import lmtool
from lmtool import kernels
from lmtool.errors import ConfigError
from lmtool.families.zamba2.config import Zamba2Config
from lmtool.generation import SamplingParams, generate
from lmtool.recurrent import ssd_chunk_scan, ssd_step

from helpers import (
    TEXT, assert_captured_step_matches_layers, generic_head_classes, name_architecture, padded_batch, randomize, run_cli,
)

FP32_TOL = 1e-4
VOCAB = 120
M, H = "mamba", "hybrid"
# Odd sizes everywhere: attention head dim 2*20/4 = 10, mamba heads of 4 (or 5), chunks of 5
# (or 4) shorter than the prompts, which are not multiples of them.
SHAPES = {
    # 3 hybrid layers over 2 shared blocks (block 0 invoked twice), q/k/v adapters, RoPE, 2 groups.
    "2blocks-adapters-rope": dict(
        layers_block_type=[M, H, M, H, H, M], num_mem_blocks=2, use_shared_attention_adapter=True,
        use_mem_rope=True, mamba_ngroups=2, n_mamba_heads=10, chunk_size=5,
    ),
    # A hybrid first layer, one block, no attention adapters, no RoPE, MQA, conv width 3.
    "1block-plain-mqa": dict(
        layers_block_type=[H, M, M, H, M], num_mem_blocks=1, num_attention_heads=5, num_key_value_heads=1,
        mamba_ngroups=1, n_mamba_heads=8, mamba_d_conv=3, chunk_size=4,
    ),
    # Biases on the projections (a left pad then feeds in_proj's bias to the conv, as in transformers).
    "1block-adapters-bias": dict(
        layers_block_type=["linear_attention", H, H, M], num_mem_blocks=1, use_shared_attention_adapter=True,
        use_mem_rope=True, mamba_ngroups=2, n_mamba_heads=10, add_bias_linear=True, chunk_size=5,
    ),
}


def tiny_config(**overrides) -> HFConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=20, intermediate_size=36, num_attention_heads=4, num_key_value_heads=4,
        mamba_d_state=6, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=10, chunk_size=5,
        adapter_rank=5, layers_block_type=[M, H, M, H], num_mem_blocks=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    values["num_hidden_layers"] = len(values["layers_block_type"])
    return HFConfig(**values)


def randomized(model: torch.nn.Module, dt_low: float = -3.0, std: float = 0.15) -> torch.nn.Module:
    """Random weights, norm scales around 1, dt from softplus(dt_low) to ~1.3 and decays
    from slow to fast across heads (so the state carries over several chunks)."""
    randomize(model, std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(1.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.linspace(dt_low, 1.0, p.numel()))
            elif name.endswith("A_log"):
                p.copy_(torch.linspace(-2.0, 1.0, p.numel()))
    return model.eval()


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    torch.manual_seed(3)
    hf = randomized(Zamba2ForCausalLM(tiny_config(**SHAPES[request.param])))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    frozen = lmtool.load(folder, dtype="float32", device="cpu")
    plain = lmtool.load(folder, dtype="float32", device="cpu", frozen=False)
    return request.param, hf, frozen, plain


def _max_diff(a, b, mask=None) -> float:
    d = (a - b).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


def test_full_forward_matches_transformers_frozen_and_not(pair):
    _, hf, frozen, plain = pair
    ids = torch.randint(3, VOCAB, (2, 13))
    with torch.no_grad():
        theirs = hf(ids, use_cache=False).logits
        assert theirs.abs().max() > 1.0  # logits of some scale: a small |Δ| means something
        for lm in (frozen, plain):
            assert _max_diff(lm.model(ids), theirs) <= FP32_TOL


def test_left_padded_batch_matches_transformers_and_rows_alone(pair):
    name, hf, lm, _ = pair
    ids, mask = padded_batch(VOCAB, (13, 9, 4))
    real = mask.bool()
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        assert _max_diff(ours, hf(ids, attention_mask=mask, use_cache=False).logits, mask) <= FP32_TOL
        if "bias" in name:
            return  # transformers' pads feed in_proj's bias to the conv: not the row alone
        for row in range(ids.shape[0]):
            alone = lm.model(ids[row : row + 1][:, real[row]])
            assert _max_diff(alone[0], ours[row, real[row]]) <= FP32_TOL


@pytest.mark.parametrize("chunks", [(7, 1, 4, 1, 1, 1, 1, 1), (1,) * 17, (3, 9, 5), (11, 6)])
def test_chunked_prefill_then_decode_equals_one_shot(pair, chunks):
    """Prefill in odd chunks (within and across the SSD chunk size, continuing the conv, SSM and
    KV state), then single tokens without a mask, left padded: every real position equals the
    full forward, itself equal to transformers."""
    _, hf, lm, _ = pair
    width = sum(chunks)
    ids, mask = padded_batch(VOCAB, (width, width - 3, width - 10))
    prompt = width - 5
    with torch.no_grad():
        full = lm.model(ids, attention_mask=mask)
        assert _max_diff(full, hf(ids, attention_mask=mask, use_cache=False).logits, mask) <= FP32_TOL
        cache = lm.model.make_cache(ids.shape[0], width)
        outs, start = [], 0
        for n in chunks:
            piece = slice(start, start + n)
            step_mask = mask[:, piece] if start < prompt else None
            outs.append(lm.model(ids[:, piece], attention_mask=step_mask, cache=cache))
            start += n
    assert _max_diff(torch.cat(outs, dim=1), full, mask) <= FP32_TOL


def test_transformers_cached_decode_matches_ours_step_by_step(pair):
    """transformers' own prefill + one-token decode steps (its decode recurrence) against ours."""
    _, hf, lm, _ = pair
    ids, mask = padded_batch(VOCAB, (12, 8))
    with torch.no_grad():
        out = hf(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for t in range(9, 12):
            out = hf(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
        cache = lm.model.make_cache(2, 12)
        ours = [lm.model(ids[:, :9], attention_mask=mask[:, :9], cache=cache)]
        ours += [lm.model(ids[:, t : t + 1], cache=cache) for t in range(9, 12)]
    assert _max_diff(torch.cat(ours, 1), torch.cat(theirs, 1), mask) <= FP32_TOL


def test_greedy_generation_equals_transformers_batched_and_alone(pair):
    """20 greedy tokens (no EOS stop on either side), left-padded batch with a chunked prefill,
    and each prompt alone."""
    name, hf, lm, _ = pair
    prompts = [[1, 17, 33, 4, 91, 5, 61, 7, 40], [1, 5, 6, 99]]
    greedy = SamplingParams(temperature=0)
    batched, _ = generate(lm.model, prompts, max_new_tokens=20, params=greedy, seed=0, eos_ids=[], prefill_chunk=3)
    ids, mask = padded_batch(VOCAB, [len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        ids[row, ids.shape[1] - len(prompt) :] = torch.tensor(prompt)
    settings = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **settings)[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        assert batched[row].token_ids == expected[row].tolist()
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), **settings)[0, len(prompt) :].tolist()
        alone, _ = generate(lm.model, [prompt], max_new_tokens=20, params=greedy, seed=0, eos_ids=[])
        assert alone[0].token_ids == want
        if "bias" not in name:  # transformers' pads feed in_proj's bias to the conv
            assert want == expected[row].tolist()


@pytest.mark.skipif(not kernels.available(), reason="no native kernels here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,weights", [(name, "dense") for name in SHAPES] + [("2blocks-adapters-rope", "int8"),
                                                                                  ("1block-adapters-bias", "int4")])
def test_captured_decode_step_gives_exactly_what_the_layers_give(tmp_path, monkeypatch, dtype, shape, weights):
    """The DecodePlan (decode.py) makes the layers' kernel calls on the same values: the same
    logits to the bit on a left-padded batch (mask, rows at different positions), over every shape
    (two shared blocks, adapters, RoPE, MQA, biases), for dense weights and int8 / int4 ones (sizes
    that groups of 32 divide)."""
    from lmtool.families.zamba2.model import Zamba2Model

    torch.manual_seed(6)
    sizes = {} if weights == "dense" else dict(hidden_size=32, intermediate_size=64, n_mamba_heads=8)
    hf = randomized(Zamba2ForCausalLM(tiny_config(**{**SHAPES[shape], **sizes})))
    hf.save_pretrained(tmp_path / "dense")
    ids, mask = padded_batch(VOCAB, lengths=(10, 7))
    assert_captured_step_matches_layers(tmp_path / "dense", dtype, weights, ids, mask, Zamba2Model, monkeypatch)


def test_decode_runs_the_layers_until_the_mamba_states_exist(tmp_path, monkeypatch):
    """A first one-token call (no prompt before it) has no Mamba2 state to continue: the plan
    declines and the layers run (and make the states); the next step is planned. Both equal the
    layers alone."""
    from lmtool.families.zamba2.decode import DecodePlan
    from lmtool.families.zamba2.model import Zamba2Model

    torch.manual_seed(7)
    randomized(Zamba2ForCausalLM(tiny_config())).save_pretrained(tmp_path)
    lm = lmtool.load(tmp_path, dtype="float32")
    ids = torch.randint(3, VOCAB, (2, 3))
    answers = []
    run = DecodePlan.run
    monkeypatch.setattr(DecodePlan, "run", lambda self, *args: answers.append(run(self, *args)) or answers[-1])

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            cache = lm.model.make_cache(2, 8)
            return torch.cat([lm.model(ids[:, t : t + 1], cache=cache) for t in range(3)], dim=1)

    planned = decode()
    if kernels.available():
        assert [a is None for a in answers] == [True, False, False]
    monkeypatch.setattr(Zamba2Model, "decode_plan", lambda self, cache, x: None)
    assert torch.equal(planned, decode())


def test_dt_clamp_applies_in_prefill_only_as_in_transformers(tmp_path):
    """dt below time_step_min is clamped in multi-token calls and not in the decode step, in
    transformers and here alike (so the decode step differs from the one-shot forward)."""
    torch.manual_seed(5)
    # A large time_step_min so the clamp changes a lot (dt of some heads is far below it).
    hf = randomized(Zamba2ForCausalLM(tiny_config(time_step_min=0.05)), dt_low=-8.0)
    hf.save_pretrained(tmp_path)
    lm = lmtool.load(tmp_path, dtype="float32")
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        one_shot = lm.model(ids)
        assert _max_diff(one_shot, hf(ids, use_cache=False).logits) <= FP32_TOL
        out = hf(ids[:, :-1], use_cache=True)
        theirs = hf(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
        cache = lm.model.make_cache(2, 11)
        lm.model(ids[:, :-1], cache=cache)
        ours = lm.model(ids[:, -1:], cache=cache)
    assert _max_diff(ours, theirs) <= FP32_TOL
    assert _max_diff(ours, one_shot[:, -1:]) > 1e-2


HEADS = generic_head_classes(Zamba2PreTrainedModel, {"sequence-classification": Zamba2ForSequenceClassification})


@pytest.mark.parametrize("task", list(HEADS))
def test_task_heads(tmp_path, task):
    """Sequence classification against transformers' class; token classification and QA as
    transformers' generic heads would have them (applied to transformers' backbone output)."""
    config = tiny_config(**SHAPES["2blocks-adapters-rope"], id2label={0: "neg", 1: "neu", 2: "pos"})
    torch.manual_seed(9)
    hf = randomized(HEADS[task](config))
    hf.save_pretrained(tmp_path)
    if task != "sequence-classification":
        name_architecture(tmp_path, "Zamba2", task)
    lm = lmtool.load(tmp_path, dtype="float32")
    assert lm.task == task
    saved = load_file(tmp_path / "model.safetensors")
    assert set(lm.model.checkpoint_state_dict()) == set(saved)
    ids, mask = padded_batch(VOCAB, (11, 7))
    with torch.no_grad():
        if task == "sequence-classification":
            expected = hf(ids, attention_mask=mask).logits
            ours = lm.model(ids, attention_mask=mask)
            assert _max_diff(ours, expected) <= FP32_TOL
            ids[1, -2:] = 0  # right padding (no mask): pooled at the last non-pad token, as transformers
            assert _max_diff(lm.model(ids), hf(ids).logits) <= FP32_TOL
            return
        hidden = hf.model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        head = getattr(hf, "qa_outputs", None) or hf.score
        expected = head(hidden)
        if task == "token-classification":
            ours = lm.model(ids, attention_mask=mask)
        else:
            ours = torch.stack(lm.model(ids, attention_mask=mask), dim=-1)
    assert ours.shape == expected.shape
    assert _max_diff(ours, expected, mask) <= FP32_TOL


def test_bfloat16_close_to_transformers(tmp_path):
    torch.manual_seed(4)
    hf = randomized(Zamba2ForCausalLM(tiny_config(**SHAPES["2blocks-adapters-rope"])), std=0.1)
    hf.save_pretrained(tmp_path)
    hf = hf.to(torch.bfloat16)
    lm = lmtool.load(tmp_path, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    ids = torch.randint(3, VOCAB, (2, 13))
    with torch.no_grad():
        ours, theirs = lm.model(ids).float(), hf(ids, use_cache=False).logits.float()
        # The decode step too (its own rounding: model-dtype products, norm in the model dtype).
        cache = lm.model.make_cache(2, 14)
        lm.model(ids[:, :-1], cache=cache)
        ours_step = lm.model(ids[:, -1:], cache=cache).float()
        out = hf(ids[:, :-1], use_cache=True)
        theirs_step = hf(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits.float()
    for a, b in ((ours, theirs), (ours_step, theirs_step)):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 0.02 * max(scale, 1.0)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_state_dict_names_are_transformers_without_copies(pair):
    """Shared blocks are saved once, under the first hybrid layer using each (as the checkpoint
    holds them); the frozen and the plain model give back exactly the saved keys and values."""
    name, hf, frozen, plain = pair
    saved = load_file(frozen.path / "model.safetensors")
    for lm in (frozen, plain):
        state = lm.model.checkpoint_state_dict()
        assert set(state) == set(saved)
        for key, tensor in saved.items():
            assert torch.equal(state[key].float(), tensor.float()), key
    hybrid = lm.config.hybrid_ids
    shared = {k.split(".")[2] for k in saved if ".shared_transformer." in k}
    assert shared == {str(i) for i in hybrid[: lm.config.num_mem_blocks]}
    # Every hybrid layer calls the block of its invocation: one object, not a copy.
    layers = plain.model.model.layers
    for j, i in enumerate(hybrid):
        assert layers[i].block is layers[hybrid[j % lm.config.num_mem_blocks]].shared_transformer
    backbone = plain.model.model
    assert len(list(backbone.named_parameters(remove_duplicate=False))) == len(list(backbone.parameters()))


def test_decode_reads_counts_each_shared_block_once_per_invocation(pair):
    """bench's bytes-read-per-step figure: how often the family says a decode step reads each
    tensor, against how often one step calls the module that holds it (forward hooks)."""
    _, _, _, plain = pair
    calls: dict[int, int] = {}
    model = plain.model
    hooks = [m.register_forward_hook(lambda m, a, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1)) for m in model.modules()]
    cache = model.make_cache(1, 16)
    # With autograd on, every module runs its own forward (no fused native step), so each call shows.
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        model(torch.randint(3, VOCAB, (1, 5)), cache=cache)
        calls.clear()
        model(torch.randint(3, VOCAB, (1, 1)), cache=cache)
    finally:
        for p in params:
            p.requires_grad_(False)
        for hook in hooks:
            hook.remove()
    owners = {f"{prefix}.{name}" if prefix else name: module for prefix, module in model.named_modules()
              for name, _ in module.named_parameters(recurse=False)}
    family, config = plain.family, plain.config
    counted = {name: calls.get(id(module), 0) for name, module in owners.items() if name.startswith("model.layers.")}
    assert max(counted.values()) > 1  # some block is invoked more than once in every shape here
    assert counted == {name: family.reads_per_step(config, name) for name in counted}


def _recurrent_bytes(cache) -> int:
    states = [getattr(entry, "state", entry) for entry in cache.layers]
    return sum(t.numel() * t.element_size() for s in states for t in s.tensors.values())


def test_mamba_state_is_constant_in_length_and_inspect_reports_it(pair, capsys):
    name, _, lm, _ = pair
    cache = lm.model.make_cache(1, 64)
    sizes = []
    with torch.no_grad():
        for n in (9, 20, 1, 1, 30):
            lm.model(torch.randint(3, VOCAB, (1, n)), cache=cache)
            sizes.append(_recurrent_bytes(cache))
    assert len(set(sizes)) == 1
    code, out, err = run_cli(capsys, "inspect", str(lm.path), "--json")
    assert code == 0, err
    result = json.loads(out)
    structure = result["structure"]
    assert result["family"] == "zamba2" and "causal-lm" in result["heads"]
    assert structure["recurrent state per sequence"] == sizes[0]
    c = lm.config
    assert structure["KV state per token"] == len(c.hybrid_ids) * 2 * c.kv_heads * c.head_dim * 4
    assert "grows with the length" in structure["decoding state"]
    kinds = c.block_types
    assert structure["layer pattern"].startswith(f"{kinds.count('mamba')} mamba, {kinds.count('hybrid')} hybrid")
    assert f"{c.num_shared_blocks} shared transformer block" in structure["shared blocks"]


def test_config_reads_legacy_keys_keeps_unknown_ones_and_rejects_bad_values():
    config = Zamba2Config.from_dict({
        "hidden_size": 64, "num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
        "num_attention_heads": 8, "n_mamba_heads": 4, "rope_theta": 500.0, "time_step_limit": [0.0, 1e9],
        "use_mamba_kernels": False, "use_long_context": True, "my_key": {"a": 1}, "torch_dtype": "bfloat16",
    })
    assert config.block_types == ["mamba", "hybrid", "mamba", "hybrid"] and config.hybrid_ids == [1, 3]
    assert config.head_dim == 16 and config.attention_scale == 8 ** -0.5
    assert config.mamba_head_dim == 32 and config.d_inner == 128 and config.conv_dim == 128 + 2 * 64
    assert config.mlp_width == 256 and config.kv_heads == 8 and config.rope_base == 500.0
    assert config.max_positions == 16384
    written = config.to_dict()
    assert written["my_key"] == {"a": 1} and written["time_step_limit"] == [0.0, 1e9]
    assert written["layers_block_type"] == ["mamba", "hybrid", "mamba", "hybrid"] and written["dtype"] == "bfloat16"
    assert written["use_mamba_kernels"] is False and written["model_type"] == "zamba2"
    again = Zamba2Config.from_dict(written)
    assert again.to_dict() == written
    # New names and transformers' derived keys as it writes them.
    saved = tiny_config(**SHAPES["1block-plain-mqa"]).to_dict()
    config = Zamba2Config.from_dict(saved)
    assert config.head_dim == 8 and config.mamba_head_dim == 5 and config.hybrid_ids == saved["hybrid_layer_ids"]
    assert Zamba2Config.from_dict({"layer_types": ["mamba", "hybrid"], "num_hidden_layers": 2}).hybrid_ids == [1]
    assert Zamba2Config.from_dict({}).hybrid_ids == [6, 12, 18, 24, 30, 36, 42, 47, 51]
    bad = {
        "num_hidden_layers": ({"num_hidden_layers": 3, "layers_block_type": ["mamba", "hybrid"]}),
        "layers_block_type": ({"num_hidden_layers": 2, "layers_block_type": ["mamba", "attention"]}),
        "n_mamba_heads": ({"n_mamba_heads": 7}),
        "mamba_ngroups": ({"n_mamba_heads": 8, "mamba_ngroups": 3}),
        "use_shared_attention_adapter": ({"use_shared_attention_adapter": True, "num_key_value_heads": 8}),
        "hybrid_layer_ids": ({"hybrid_layer_ids": [5]}),
        "'hidden_size' should be int": ({"hidden_size": "big"}),
        "hidden_act": ({"hidden_act": "swish-ish"}),
    }
    for key, data in bad.items():
        with pytest.raises(ConfigError, match=key):
            Zamba2Config.from_dict(data, source="zamba2/config.json")


def test_transformers_loads_what_lmtool_writes(tmp_path):
    data = tiny_config(**SHAPES["2blocks-adapters-rope"]).to_dict()
    (tmp_path / "config.json").write_text(Zamba2Config.from_dict(data).to_json())
    again = HFConfig.from_pretrained(tmp_path)
    assert again.hybrid_layer_ids == [1, 3, 4] and again.num_mem_blocks == 2
    assert again.attention_head_dim == 10 and again.mamba_headdim == 4 and again.use_shared_attention_adapter


def test_ssd_chunk_scan_and_step_match_a_sequential_loop():
    """The chunked scan (ragged last chunk, carried-in state) and the one-step recurrence against
    the recurrence written out position by position."""
    torch.manual_seed(0)
    b, T, Hh, P, G, N = 2, 11, 6, 3, 2, 5
    x, dt = torch.randn(b, T, Hh, P), torch.rand(b, T, Hh) * 0.5
    A, Bm, Cm, D = -torch.rand(Hh) * 2, torch.randn(b, T, G, N), torch.randn(b, T, G, N), torch.randn(Hh)
    h0 = torch.randn(b, Hh, P, N)
    group = torch.arange(Hh) // (Hh // G)
    state, expected = h0.clone(), []
    for t in range(T):
        Bh, Ch = Bm[:, t, group], Cm[:, t, group]  # [b,H,N]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None]
        expected.append((state * Ch[:, :, None]).sum(-1) + D[:, None] * x[:, t])
    expected = torch.stack(expected, dim=1)
    for chunk in (4, 11, 64):
        y, last = ssd_chunk_scan(x, dt, A, Bm, Cm, chunk, D=D, initial_state=h0)
        assert (y - expected).abs().max() <= 1e-4 and (last - state).abs().max() <= 1e-4
    y, last = ssd_chunk_scan(x[:, :-1], dt[:, :-1], A, Bm[:, :-1], Cm[:, :-1], 4, D=D, initial_state=h0)
    y1, last1 = ssd_step(last, x[:, -1], dt[:, -1], A, Bm[:, -1], Cm[:, -1], D)
    assert (y1 - expected[:, -1]).abs().max() <= 1e-4 and (last1 - state).abs().max() <= 1e-4


# --- tokenizer -------------------------------------------------------------------------------------


def mistral_style_tokenizer():
    """A small Llama/Mistral SentencePiece-style BPE: <unk>/<s>/</s> = 0/1/2, the 256 byte
    pieces next, then merged pieces; byte fallback; Metaspace with a "▁" on the first word only
    (prepend_scheme "first", split False); decoder Replace, ByteFallback, Fuse, Strip one space;
    a post-processor that adds <s> (transformers 5 takes BOS from it, not from
    tokenizer_config.json, when tokenizer.json exists); a [PAD] special token at the end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    data = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for piece, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    data["model"]["vocab"] = vocab
    data["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(["[PAD]"])
    return tok


def test_tokenizer_agrees_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    from lmtool.families.zamba2 import FAMILY
    from lmtool.tokenizer import Tokenizer

    mistral_style_tokenizer().save(str(tmp_path / "tokenizer.json"))
    settings = {**FAMILY.tokenizer_config, "pad_token": "[PAD]", "legacy": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path, family=FAMILY, config=Zamba2Config())
    assert ours.bos_id == 1 and ours.eos_ids[0] == 2 and ours.pad_id == theirs.pad_token_id
    texts = [
        "Hey how are you doing on this lovely evening?", " leading space", "  two leading spaces",
        "The  quick\tbrown\nfox.", "Zürich, Kraków and São Paulo; naïve café", "生活的真谛是 🙂", "",
        "trailing space ", "Simple is better than complex.",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 1
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), text
    ids, mask = ours.batch_encode(texts[:4])
    batch = theirs(texts[:4], padding=True, return_tensors="pt")
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    assert ids[1, 0].item() == theirs.pad_token_id  # padded on the left


def test_convert_round_trip_loads_in_transformers(tmp_path, pair, capsys):
    """`lmtool convert --dtype` writes the shared blocks once, under the first hybrid layer of
    each, as transformers saves and loads them."""
    _, hf, frozen, _ = pair
    out = tmp_path / "bf16"
    code, _, err = run_cli(capsys, "convert", str(frozen.path), str(out), "--dtype", "bfloat16")
    assert code == 0, err
    again, info = Zamba2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(load_file(out / "model.safetensors")) == set(load_file(frozen.path / "model.safetensors"))
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        expected = copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.float()
        ours = lmtool.load(out).model(ids).float()
    assert again.dtype == torch.bfloat16
    assert (ours - expected).abs().max().item() <= 0.02 * max(expected.abs().max().item(), 1.0)
