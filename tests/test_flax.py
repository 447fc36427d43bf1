"""Flax flax_model.msgpack checkpoints (FlaxBloom*, FlaxGemma*) -> the standard layout, read
without jax or flax. Fixtures are written by a small msgpack encoder below (independent of the
msgpack package lmtool decodes with), in the layout flax.serialization uses (arrays as ExtType 1
of (shape, dtype name, bytes), chunked big arrays)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import BloomForCausalLM, GemmaForCausalLM

import lmtool
from lmtool.checkpoint import Checkpoint
from lmtool.convert import ConvertOptions, convert, find_converter
from lmtool.errors import CheckpointError, ConfigError
from lmtool.flax_msgpack import FlaxArray, decode

from helpers import randomize, tiny_gemma_config
from test_bloom import FP32_TOL, VOCAB, bloom_style_tokenizer, tiny_config

# --- a small msgpack encoder (the test's own; lmtool only decodes) ------------------------------


class Ext:
    def __init__(self, code: int, data: bytes):
        self.code, self.data = code, data


def _sized(n: int, small: tuple[int, int] | None, codes: tuple[int, int, int]) -> bytes:
    if small and n < small[1]:
        return bytes([small[0] | n])
    for code, fmt in zip(codes, (">B", ">H", ">I")):
        if code and n < 256 ** struct.calcsize(fmt):
            return bytes([code]) + struct.pack(fmt, n)
    raise ValueError(n)


def pack(obj) -> bytes:
    if obj is None or isinstance(obj, bool):
        return bytes([{None: 0xC0, False: 0xC2, True: 0xC3}[obj]])
    if isinstance(obj, int):
        if 0 <= obj < 128 or -32 <= obj < 0:
            return struct.pack(">b" if obj < 0 else ">B", obj)
        for code, fmt in ((0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")) if obj < 0 else (
            (0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q")
        ):
            try:
                return bytes([code]) + struct.pack(fmt, obj)
            except struct.error:
                continue
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        raw = obj.encode()
        return _sized(len(raw), (0xA0, 32), (0xD9, 0xDA, 0xDB)) + raw
    if isinstance(obj, bytes):
        return _sized(len(obj), None, (0xC4, 0xC5, 0xC6)) + obj
    if isinstance(obj, (list, tuple)):
        return _sized(len(obj), (0x90, 16), (0, 0xDC, 0xDD)) + b"".join(pack(x) for x in obj)
    if isinstance(obj, dict):
        items = b"".join(pack(k) + pack(v) for k, v in obj.items())
        return _sized(len(obj), (0x80, 16), (0, 0xDE, 0xDF)) + items
    if isinstance(obj, torch.Tensor):
        name = str(obj.dtype).removeprefix("torch.")
        data = obj.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b""
        return pack(Ext(1, pack([list(obj.shape), name, data])))
    if isinstance(obj, Ext):
        n = len(obj.data)
        fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        head = bytes([fixed[n]]) if n in fixed else _sized(n, None, (0xC7, 0xC8, 0xC9))
        return head + struct.pack(">b", obj.code) + obj.data
    raise TypeError(type(obj))


def chunked(t: torch.Tensor, pieces: int) -> dict:
    """flax.serialization's form of an array too big for one msgpack object."""
    flat = t.reshape(-1).chunk(pieces)
    return {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): d for i, d in enumerate(t.shape)},
        "chunks": {str(i): c.clone() for i, c in enumerate(flat)},
    }


# --- Flax trees of transformers models (original-formats §4) -------------------------------------


def _dense(sd, name, bias=True):
    out = {"kernel": sd[f"{name}.weight"].T.contiguous()}
    if bias:
        out["bias"] = sd[f"{name}.bias"]
    return out


def _layer_norm(sd, name):
    return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def flax_bloom_tree(hf: BloomForCausalLM) -> dict:
    """The params of FlaxBloomModel (FlaxBloomForCausalLM wraps it under 'transformer')."""
    sd = hf.transformer.state_dict()
    layers = {
        str(i): {
            "input_layernorm": _layer_norm(sd, f"h.{i}.input_layernorm"),
            "self_attention": {
                "query_key_value": _dense(sd, f"h.{i}.self_attention.query_key_value"),
                "dense": _dense(sd, f"h.{i}.self_attention.dense"),
            },
            "post_attention_layernorm": _layer_norm(sd, f"h.{i}.post_attention_layernorm"),
            "mlp": {
                "dense_h_to_4h": _dense(sd, f"h.{i}.mlp.dense_h_to_4h"),
                "dense_4h_to_h": _dense(sd, f"h.{i}.mlp.dense_4h_to_h"),
            },
        }
        for i in range(hf.config.n_layer)
    }
    return {
        "word_embeddings": {"embedding": sd["word_embeddings.weight"]},
        "word_embeddings_layernorm": _layer_norm(sd, "word_embeddings_layernorm"),
        "h": layers,
        "ln_f": _layer_norm(sd, "ln_f"),
    }


def flax_gemma_tree(hf: GemmaForCausalLM) -> dict:
    """The params of FlaxGemmaForCausalLM (lm_head only when untied)."""
    sd = hf.state_dict()

    def layer(i):
        p = f"model.layers.{i}"
        return {
            "input_layernorm": {"weight": sd[f"{p}.input_layernorm.weight"]},
            "post_attention_layernorm": {"weight": sd[f"{p}.post_attention_layernorm.weight"]},
            "self_attn": {
                n: _dense(sd, f"{p}.self_attn.{n}", bias=False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            },
            "mlp": {n: _dense(sd, f"{p}.mlp.{n}", bias=False) for n in ("gate_proj", "up_proj", "down_proj")},
        }

    tree = {"model": {
        "embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
        "layers": {str(i): layer(i) for i in range(hf.config.num_hidden_layers)},
        "norm": {"weight": sd["model.norm.weight"]},
    }}
    if not hf.config.tie_word_embeddings:
        tree["lm_head"] = _dense(sd, "lm_head", bias=False)
    return tree


def to_bfloat16(tree):
    if isinstance(tree, dict):
        return {k: to_bfloat16(v) for k, v in tree.items()}
    return tree.to(torch.bfloat16)


def write_flax(folder: Path, tree: dict, config=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flax_model.msgpack").write_bytes(pack(tree))
    if config is not None:
        config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bloom():
    torch.manual_seed(4)
    return randomize(BloomForCausalLM(tiny_config(hidden_size=48, n_head=6)))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- conversions --------------------------------------------------------------------------------


def test_flax_bloom_for_causal_lm_converts_to_equal_logits(tmp_path, bloom):
    src = write_flax(tmp_path / "flax", {"transformer": flax_bloom_tree(bloom)}, bloom.config)
    assert find_converter(src, None).name == "bloom-flax"
    convert(src, tmp_path / "out")
    ids = torch.randint(4, VOCAB, (2, 9))
    theirs = BloomForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits_of(theirs, ids) - logits_of(bloom, ids)).abs().max().item() == 0.0
    ours = lmtool.load(tmp_path / "out", dtype="float32", device="cpu").model
    with torch.no_grad():
        assert (ours(ids) - logits_of(bloom, ids)).abs().max().item() <= FP32_TOL


def test_flax_bloom_model_in_bfloat16_with_a_chunked_embedding_config_and_tokenizer_options(tmp_path, bloom):
    tree = flax_bloom_tree(bloom)
    tree = {"params": to_bfloat16(tree)}
    tree["params"]["word_embeddings"]["embedding"] = chunked(tree["params"]["word_embeddings"]["embedding"], 3)
    src = write_flax(tmp_path / "flax", tree)  # no config.json: detected by its tree, config given
    assert find_converter(src, None).name == "bloom-flax"
    config = tmp_path / "config.json"
    bloom.config.to_json_file(config)
    tokenizer = bloom_style_tokenizer(tmp_path / "tok") / "tokenizer.json"
    summary = convert(src, tmp_path / "out", options=ConvertOptions(config_file=config, tokenizer=tokenizer))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
    written = Checkpoint(tmp_path / "out")
    for name, value in bloom.state_dict().items():
        if name != "lm_head.weight":  # tied: not written
            assert torch.equal(written.tensor(name), value.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_flax_gemma_untied_converts_to_equal_logits(tmp_path):
    torch.manual_seed(5)
    hf = randomize(GemmaForCausalLM(tiny_gemma_config(tie_word_embeddings=False)))
    src = write_flax(tmp_path / "flax", flax_gemma_tree(hf), hf.config)
    assert find_converter(src, None).name == "gemma-flax"
    convert(src, tmp_path / "out")
    ids = torch.randint(3, 120, (2, 9))
    theirs = GemmaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits_of(theirs, ids) - logits_of(hf, ids)).abs().max().item() == 0.0
    with torch.no_grad():
        ours = lmtool.load(tmp_path / "out", dtype="float32", device="cpu").model(ids)
    assert (ours - logits_of(hf, ids)).abs().max().item() <= FP32_TOL


def test_sharded_flax_checkpoint_with_index(tmp_path, bloom):
    tree = flax_bloom_tree(bloom)
    src = tmp_path / "flax"
    src.mkdir()
    first = {"transformer": {k: v for k, v in tree.items() if k != "h"}}
    second = {"transformer": {"h": tree["h"]}}
    names = ["flax_model-00001-of-00002.msgpack", "flax_model-00002-of-00002.msgpack"]
    for name, part in zip(names, (first, second)):
        (src / name).write_bytes(pack(part))
    (src / "flax_model.msgpack.index.json").write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1]}}))
    bloom.config.save_pretrained(src)
    convert(src, tmp_path / "out")
    ids = torch.randint(4, VOCAB, (1, 7))
    theirs = BloomForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits_of(theirs, ids) - logits_of(bloom, ids)).abs().max().item() == 0.0


def test_wrong_config_and_missing_config_are_one_line_errors(tmp_path, bloom):
    src = write_flax(tmp_path / "flax", {"transformer": flax_bloom_tree(bloom)})
    with pytest.raises(ConfigError, match="no config.json beside the Flax weights; pass one with --config"):
        convert(src, tmp_path / "out", from_format="bloom-flax")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "bloom", "hidden_size": 48, "n_head": 6, "n_layer": 3,
                                  "vocab_size": VOCAB}))
    with pytest.raises(CheckpointError, match="flax: missing tensor 'transformer.h.2.input_layernorm.weight'"):
        convert(src, tmp_path / "out", from_format="bloom-flax", options=ConvertOptions(config_file=config))
    assert not (tmp_path / "out").exists()


# --- the decoder ---------------------------------------------------------------------------------


def test_decoder_reads_every_msgpack_type_it_may_meet():
    values = [0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63, -1, -32, -33, -128, -129, -32768, -32769,
              -(2**31) - 1, 1.5, -2.25e300, "", "é" * 20, "x" * 300, "y" * 70000, None, True, False,
              list(range(20)), {str(i): i for i in range(20)}, {"nested": {"list": [1, [2, [3]]]}}]
    assert decode(pack(values)) == values
    assert decode(pack([b"", b"ab", b"z" * 300, b"w" * 70000])) == [b"", b"ab", b"z" * 300, b"w" * 70000]
    array = decode(pack(torch.arange(6, dtype=torch.int16).reshape(2, 3)))
    assert isinstance(array, FlaxArray) and torch.equal(array.load(), torch.arange(6, dtype=torch.int16).reshape(2, 3))
    scalar = decode(pack(Ext(3, pack([[], "float32", struct.pack("<f", 2.5)]))))
    assert scalar.load().item() == 2.5


def test_decoder_reads_what_the_msgpack_package_writes():
    """flax writes with the msgpack package: every ext size it may choose (fixext, ext 8/16/32)."""
    import msgpack

    arrays = {str(n): torch.arange(n, dtype=torch.uint8) for n in (0, 1, 2, 4, 8, 16, 200, 70000, 2**16 + 3)}
    tree = {"params": {key: msgpack.ExtType(1, msgpack.packb([list(t.shape), "uint8", bytes(t.tolist())]))
                       for key, t in arrays.items()}, "step": 7, "name": "x" * 5000}
    decoded = decode(msgpack.packb(tree))
    assert decoded["step"] == 7 and decoded["name"] == "x" * 5000
    assert all(torch.equal(decoded["params"][key].load(), t) for key, t in arrays.items())


def test_decoder_errors_name_the_file(tmp_path):
    good = pack({"a": {"kernel": torch.ones(2, 3)}})
    cases = {
        "truncated.msgpack": (good[:-5], "truncated msgpack data"),
        "trailing.msgpack": (good + b"\x00", "1 bytes of trailing data"),
        "dtype.msgpack": (pack({"a": Ext(1, pack([[2], "complex64", b"\0" * 16]))}), "unsupported array encoding"),
        "size.msgpack": (pack({"a": Ext(1, pack([[3], "float32", b"\0" * 8]))}), "wrong number of bytes"),
        "leaf.msgpack": (pack({"a": {"b": 3}}), "'a/b' is not an array"),
    }
    from lmtool.flax_msgpack import read_msgpack

    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{name}: .*{message}"):
            read_msgpack(tmp_path / name)
