"""Tiny Gemma fixtures built offline: a SentencePiece tokenizer, a random transformers
GemmaForCausalLM, and that model rewritten in the original formats (gemma_pytorch .ckpt, the
int8 variant, the JAX/Flax orbax tree)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIAL_PIECES = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]

# Texts that exercise the tokenizer: spaces and runs of them, newlines, tabs, digits, punctuation,
# non-ASCII (byte fallback: none of it is in the tiny vocabulary), user-defined pieces, nothing.
SAMPLE_TEXTS = [
    "",
    "katori mona",
    "the quick brown fox jumps over the lazy dog.",
    "Hi  Hello   there",
    "line one\nline two\n\n  indented\n",
    "tab\tseparated\tvalues",
    "digits 12345 and 3.14159, 2024-02-21",
    "héllo wörld, 生活的真谛是 🙂",
    "<start_of_turn>user\nkato rina?<end_of_turn>\n<start_of_turn>model\n",
    "trailing spaces   ",
    " leading space",
    "   ",
]


def corpus(lines: int = 400, seed: int = 0) -> str:
    """A few KB of made-up words, digits and punctuation (ASCII only)."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mo", "na", "se", "lu", "pe", "an", "in", "the", "er", "on", "qu"]
    out = []
    for _ in range(lines):
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        line = rng.choice([" ", " ", "  ", ", "]).join(words) + rng.choice([".", "!", "?", ""])
        out.append(("  " if rng.random() < 0.2 else "") + line)
    return "\n".join(out)


def train_tokenizer(folder: Path, model_type: str = "bpe", add_dummy_prefix: bool = False, vocab_size: int = 320) -> Path:
    """A SentencePiece model trained like Gemma's (byte fallback, identity normalization, no dummy
    prefix, pad/eos/bos/unk = 0/1/2/3, <start_of_turn>/<end_of_turn> user-defined); returns its path."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text(corpus(), encoding="utf-8")
    prefix = folder / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        user_defined_symbols=TURN_TOKENS,
        num_threads=1,
        minloglevel=2,
        **SPECIAL_PIECES,
    )
    text.unlink()
    Path(f"{prefix}.vocab").unlink()
    return Path(f"{prefix}.model")


# --- models ------------------------------------------------------------------------------------


def tiny_gemma(vocab_size: int = 320, heads: int = 4, kv_heads: int = 1, seed: int = 0, **changes):
    """A random fp32 transformers GemmaForCausalLM: hidden 64, 2 layers, head_dim 16. Every
    parameter is random (the norms start at zero otherwise, hiding norm mistakes)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    values = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        max_position_embeddings=64, hidden_act="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    values.update(changes)
    torch.manual_seed(seed)
    model = GemmaForCausalLM(GemmaConfig(**values)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def freqs_cis(head_dim: int, positions: int, theta: float = 10000.0) -> torch.Tensor:
    """gemma_pytorch's rotary table: (positions, head_dim / 2) complex64."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def gemma_pytorch_state_dict(model, theta: float = 10000.0) -> dict[str, torch.Tensor]:
    """The model's weights under gemma_pytorch's names: fused qkv_proj, embedder.weight, freqs_cis."""
    config = model.config
    sd = {"freqs_cis": freqs_cis(config.head_dim, 2 * config.max_position_embeddings, theta)}
    sd["embedder.weight"] = model.model.embed_tokens.weight.detach().clone()
    for key, value in model.model.state_dict().items():
        if key.startswith("layers.") and ".self_attn." in key and key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            continue
        if key != "embed_tokens.weight":
            sd["model." + key] = value.detach().clone()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        sd[f"model.layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        ).detach().clone()
    return sd


def quantize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gemma_pytorch's int8 variant: every 2-D weight as int8 plus a per-row float weight_scaler."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.dim() == 2:
            scaler = value.abs().amax(dim=1) / 127
            out[key] = torch.round(value / scaler[:, None]).to(torch.int8)
            out[key + "_scaler"] = scaler
        else:
            out[key] = value
    return out


def dequantized_model(model, quantized_sd: dict[str, torch.Tensor]):
    """The model with the weights the int8 checkpoint stands for (what gemma_pytorch computes with)."""
    values = {}
    for key, value in quantized_sd.items():
        if value.dtype == torch.int8:
            values[key] = value.float() * quantized_sd[key + "_scaler"][:, None]
    config = model.config
    H, K, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(values["embedder.weight"])
        for i, layer in enumerate(model.model.layers):
            q, k, v = values[f"model.layers.{i}.self_attn.qkv_proj.weight"].split([H * hd, K * hd, K * hd])
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
            for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                layer.get_submodule(name).weight.copy_(values[f"model.layers.{i}.{name}.weight"])
    return model


def save_ckpt(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model_state_dict": sd}, path)
    return path


def orbax_tree(model, padded_rows: int) -> dict:
    """The model as the Flax release's semi-flat parameter tree (numpy arrays), with the embedding
    padded to padded_rows by junk rows, as the released 256128-row embedding is."""
    import numpy as np

    config = model.config
    H, K, hd, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size

    def array(t: torch.Tensor):
        return np.ascontiguousarray(t.detach().numpy())

    def heads_first(weight: torch.Tensor, heads: int) -> torch.Tensor:  # (heads*hd, D) -> (heads, D, hd)
        return weight.reshape(heads, hd, D).permute(0, 2, 1)

    embedding = model.model.embed_tokens.weight
    junk = torch.randn(padded_rows - embedding.shape[0], D)
    tree = {
        "transformer/embedder": {"input_embedding": array(torch.cat([embedding, junk]))},
        "transformer/final_norm": {"scale": array(model.model.norm.weight)},
    }
    for i, layer in enumerate(model.model.layers):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"transformer/layer_{i}/"
        q = heads_first(attn.q_proj.weight, H)
        k, v = heads_first(attn.k_proj.weight, K), heads_first(attn.v_proj.weight, K)
        if H == K:
            tree[prefix + "attn/qkv_einsum"] = {"w": array(torch.stack([q, k, v]))}
        else:
            tree[prefix + "attn/q_einsum"] = {"w": array(q)}
            tree[prefix + "attn/kv_einsum"] = {"w": array(torch.stack([k, v]))}
        tree[prefix + "attn/attn_vec_einsum"] = {"w": array(attn.o_proj.weight.reshape(D, H, hd).permute(1, 2, 0))}
        tree[prefix + "mlp/gating_einsum"] = {"w": array(torch.stack([mlp.gate_proj.weight.T, mlp.up_proj.weight.T]))}
        tree[prefix + "mlp/linear"] = {"w": array(mlp.down_proj.weight.T)}
        tree[prefix + "pre_attention_norm"] = {"scale": array(layer.input_layernorm.weight)}
        tree[prefix + "pre_ffw_norm"] = {"scale": array(layer.post_attention_layernorm.weight)}
    return tree


def save_orbax(tree: dict, path: Path) -> Path:
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(path.resolve(), tree)
    return path
