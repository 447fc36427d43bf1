"""The authors' RecurrentGemma (PyPI `recurrentgemma`, its torch Griffin) as a test oracle.

`import recurrentgemma` runs the package __init__, which imports its JAX half (flax); the torch
half needs none of it, so we import its submodules under a stub package (original-formats.md
§2.5). Weights go between the two layouts with the mapping written out independently of
lmtool's converter, so a converter test compares two separate readings of the format.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch


def griffin_modules():
    """(common, recurrentgemma.torch) or skip when the package is absent."""
    if "recurrentgemma.torch" not in sys.modules:
        spec = importlib.util.find_spec("recurrentgemma")
        if spec is None:
            pytest.skip("the authors' package is not installed (pip install recurrentgemma)")
        if "recurrentgemma" not in sys.modules:
            stub = types.ModuleType("recurrentgemma")
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules["recurrentgemma"] = stub
    from recurrentgemma import common
    from recurrentgemma import torch as rgt

    return common, rgt


def griffin_config(hf_config):
    """The authors' GriffinConfig of a transformers RecurrentGemmaConfig (MQA only: the authors'
    attention always has one key/value head)."""
    common, _ = griffin_modules()
    kinds = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
    pattern = list(hf_config.block_types)
    blocks = tuple(kinds[pattern[i % len(pattern)]] for i in range(hf_config.num_hidden_layers))
    return common.GriffinConfig(
        vocab_size=hf_config.vocab_size,
        width=hf_config.hidden_size,
        mlp_expanded_width=hf_config.intermediate_size // 2,
        num_heads=hf_config.num_attention_heads,
        lru_width=hf_config.lru_width,
        block_types=blocks,
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=hf_config.attention_window_size,
        logits_soft_cap=hf_config.logits_soft_cap,
    )


def hf_to_griffin_state(hf_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers' state dict -> the authors' (the layout of their released .pt files)."""
    out = {"embedder.input_embedding": hf_state["model.embed_tokens.weight"], "final_norm.scale": hf_state["model.final_norm.weight"]}
    pattern = list(config.block_types)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "temporal_pre_norm.scale"] = hf_state[src + "temporal_pre_norm.weight"]
        out[dst + "channel_pre_norm.scale"] = hf_state[src + "channel_pre_norm.weight"]
        mlp = src + "mlp_block."
        out[dst + "mlp_block.ffw_up.w"] = torch.stack([hf_state[mlp + "gate_proj.weight"].T, hf_state[mlp + "up_proj.weight"].T])
        out[dst + "mlp_block.ffw_up.b"] = torch.stack([hf_state[mlp + "gate_proj.bias"], hf_state[mlp + "up_proj.bias"]])[:, None, None, :]
        out[dst + "mlp_block.ffw_down.weight"] = hf_state[mlp + "down_proj.weight"]
        out[dst + "mlp_block.ffw_down.bias"] = hf_state[mlp + "down_proj.bias"]
        t = src + "temporal_block."
        if pattern[i % len(pattern)] == "attention":
            a = dst + "attention_block."
            for ours, theirs in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v")):
                out[a + theirs + ".weight"] = hf_state[t + ours + ".weight"]
            out[a + "proj_final.weight"] = hf_state[t + "o_proj.weight"]
            out[a + "proj_final.bias"] = hf_state[t + "o_proj.bias"]
        else:
            r = dst + "recurrent_block."
            for name in ("linear_x", "linear_y", "linear_out"):
                out[r + name + ".weight"] = hf_state[t + name + ".weight"]
                out[r + name + ".bias"] = hf_state[t + name + ".bias"]
            out[r + "conv_1d.w"] = hf_state[t + "conv_1d.weight"][:, 0, :].T.contiguous()
            out[r + "conv_1d.b"] = hf_state[t + "conv_1d.bias"]
            lru = t + "rg_lru."
            out[r + "rg_lru.a_param"] = hf_state[lru + "recurrent_param"]
            out[r + "rg_lru.input_gate.w"] = hf_state[lru + "input_gate_weight"]
            out[r + "rg_lru.input_gate.b"] = hf_state[lru + "input_gate_bias"]
            out[r + "rg_lru.a_gate.w"] = hf_state[lru + "recurrent_gate_weight"]
            out[r + "rg_lru.a_gate.b"] = hf_state[lru + "recurrent_gate_bias"]
    return {k: v.contiguous() for k, v in out.items()}


def griffin_from_hf(hf_model, dtype=torch.float32):
    """The authors' Griffin holding the weights of a transformers RecurrentGemmaForCausalLM."""
    _, rgt = griffin_modules()
    model = rgt.Griffin(griffin_config(hf_model.config), gradient_checkpointing=False, device="cpu", dtype=dtype)
    state = hf_to_griffin_state(hf_model.state_dict(), hf_model.config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def griffin_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full-forward logits; a left-padded row's pads are separate one-token segments (position
    0), so its real tokens start a segment of their own, as the authors' sampler does."""
    if mask is None:
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    else:
        positions = ((mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long())
    with torch.no_grad():
        logits, _ = model(ids, positions, return_logits=True, return_cache=False)
    return logits


def griffin_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of the authors' model for one prompt, by full forwards (no cache: their
    cached path is checked separately by them; this is the definition)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = griffin_logits(model, torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
