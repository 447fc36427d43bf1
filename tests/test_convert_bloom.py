"""Megatron-DeepSpeed BLOOM checkpoints (tensor-parallel shards) -> the standard layout."""

from __future__ import annotations

import argparse
import enum
import json
from pathlib import Path

import pytest
import torch
from transformers import BloomForCausalLM

import lmtool
from lmtool.convert import ConvertOptions, convert, find_converter
from lmtool.errors import CheckpointError, ConfigError

from helpers import randomize
from test_bloom import FP32_TOL, VOCAB, bloom_style_tokenizer, tiny_config

# How Megatron splits each transformer-layer tensor over tensor-parallel ranks (original-formats
# §3.1): column-parallel on dim 0, row-parallel weights on dim 1, the rest replicated (None).
SPLIT = {
    "input_layernorm.weight": None, "input_layernorm.bias": None,
    "self_attention.query_key_value.weight": 0, "self_attention.query_key_value.bias": 0,
    "self_attention.dense.weight": 1, "self_attention.dense.bias": None,
    "post_attention_layernorm.weight": None, "post_attention_layernorm.bias": None,
    "mlp.dense_h_to_4h.weight": 0, "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1, "mlp.dense_4h_to_h.bias": None,
}


class Precision(enum.Enum):  # stands for the Megatron enums that weights_only refuses
    BF16 = "bf16"


def shard(t: torch.Tensor, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    return (t if dim is None else t.chunk(tp, dim)[rank]).clone()  # clone: save only the shard


def write_megatron(folder: Path, hf: BloomForCausalLM, tp: int, args: dict | None = None) -> Path:
    """The pipeline files of `hf` split over `tp` ranks: layer_01 embedding (with its LayerNorm),
    layer_03.. transformer layers, then the final LayerNorm; and mp_rank_00 with the arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = hf.transformer.state_dict()
    layers = hf.config.n_layer

    def save(index: int, rank: int, state: dict) -> None:
        torch.save(state, folder / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")

    for r in range(tp):
        save(1, r, {
            "word_embeddings.weight": shard(sd["word_embeddings.weight"], 0, tp, r),
            "word_embeddings.norm.weight": sd["word_embeddings_layernorm.weight"].clone(),
            "word_embeddings.norm.bias": sd["word_embeddings_layernorm.bias"].clone(),
        })
        for i in range(layers):
            save(3 + i, r, {key: shard(sd[f"h.{i}.{key}"], dim, tp, r) for key, dim in SPLIT.items()})
        save(layers + 4, r, {"weight": sd["ln_f.weight"].clone(), "bias": sd["ln_f.bias"].clone()})
    if args is not None:
        torch.save({"args": argparse.Namespace(**args), "iteration": 10, "module": None},
                   folder / "mp_rank_00_model_states.pt")
    return folder


def megatron_args(hf: BloomForCausalLM, tp: int, **extra) -> dict:
    c = hf.config
    return dict(num_attention_heads=c.n_head, hidden_size=c.hidden_size, num_layers=c.n_layer,
                layernorm_epsilon=c.layer_norm_epsilon, tensor_model_parallel_size=tp,
                apply_residual_connection_post_layernorm=False, seq_length=64, bf16=False, **extra)


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values))
    return path


def assert_same_logits(hf: BloomForCausalLM, out: Path) -> None:
    ids = torch.randint(4, VOCAB, (2, 10))
    with torch.no_grad():
        want = hf(ids).logits
        theirs = BloomForCausalLM.from_pretrained(out).eval()(ids).logits  # transformers, unchanged
        ours = lmtool.load(out, dtype="float32", device="cpu").model(ids)
    assert (theirs - want).abs().max().item() == 0.0  # merging shards is exact
    assert (ours - want).abs().max().item() <= FP32_TOL


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(2)
    return randomize(BloomForCausalLM(tiny_config(hidden_size=48, n_head=6)))


def test_tp2_with_training_arguments_converts_exactly_and_streams(tmp_path, source, monkeypatch):
    src = write_megatron(tmp_path / "global_step10", source, tp=2, args=megatron_args(source, 2))
    assert find_converter(src, None).name == "bloom-megatron"
    loads: dict[str, list] = {}
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        loads.setdefault(Path(path).name, []).append(kwargs)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    summary = convert(src, tmp_path / "out", options=ConvertOptions(tokenizer=bloom_style_tokenizer(tmp_path / "tok")))
    monkeypatch.undo()
    assert summary["format"] == "bloom-megatron" and summary["notes"] == []
    # Every file is read under weights_only, memory-mapped; each layer once to plan, once to write.
    assert all(kw["weights_only"] and kw.get("mmap") for calls in loads.values() for kw in calls)
    layer_loads = [len(calls) for name, calls in loads.items() if name.startswith("layer_")]
    assert layer_loads == [2] * 8  # (embedding + 2 blocks + final norm) x 2 ranks
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_head"], config["n_layer"], config["hidden_size"], config["vocab_size"]) == (6, 2, 48, VOCAB)
    assert config["pretraining_tp"] == 2 and config["architectures"] == ["BloomForCausalLM"]
    assert_same_logits(source, tmp_path / "out")
    tok = lmtool.load(tmp_path / "out", device="cpu").tokenizer
    assert tok is not None and not tok.add_bos and tok.pad_id == 3


def test_tp3_with_head_count_from_config_file(tmp_path, source):
    src = write_megatron(tmp_path / "ckpt", source, tp=3)
    options = ConvertOptions(config_file=write_config(tmp_path / "c.json", n_head=6, pad_token_id=3))
    convert(src, tmp_path / "out", options=options)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == 3
    assert_same_logits(source, tmp_path / "out")


def test_unsafe_training_arguments_are_skipped_and_config_is_then_required(tmp_path, source):
    src = write_megatron(tmp_path / "ckpt", source, tp=2, args=megatron_args(source, 2, precision=Precision.BF16))
    with pytest.raises(ConfigError, match=r"head count cannot be read.*--config.*cannot be loaded safely"):
        convert(src, tmp_path / "out")
    options = ConvertOptions(config_file=write_config(tmp_path / "c.json", num_attention_heads=6))
    summary = convert(src, tmp_path / "out", options=options)
    assert any("mp_rank_00_model_states.pt" in note for note in summary["notes"])
    assert_same_logits(source, tmp_path / "out")


def test_replicated_tensors_that_drifted_are_reported_and_averaged(tmp_path, source):
    src = write_megatron(tmp_path / "ckpt", source, tp=2, args=megatron_args(source, 2))
    path = src / "layer_03-model_01-model_states.pt"
    state = torch.load(path)
    state["input_layernorm.weight"] = state["input_layernorm.weight"] + 0.5
    torch.save(state, path)
    summary = convert(src, tmp_path / "out")
    assert summary["notes"] == ["transformer.h.0.input_layernorm.weight: differs across tensor-parallel ranks "
                                "of layer 03; averaged"]
    model = lmtool.load(tmp_path / "out", dtype="float32", device="cpu").model
    merged = model.transformer.h[0].input_layernorm.weight
    expected = source.transformer.h[0].input_layernorm.weight + 0.25
    assert (merged - expected).abs().max().item() <= 1e-6


def test_broken_folders_give_one_line_errors(tmp_path, source):
    src = write_megatron(tmp_path / "ckpt", source, tp=2)
    with pytest.raises(ConfigError, match="pass --config"):
        convert(src, tmp_path / "out")
    bad = write_config(tmp_path / "bad.json", n_head=6, hidden_size=64)
    with pytest.raises(ConfigError, match=r"bad.json: 'hidden_size' is 64, the weights in .* say 48"):
        convert(src, tmp_path / "out", options=ConvertOptions(config_file=bad))
    embeddings = [src / f"layer_01-model_0{r}-model_states.pt" for r in range(2)]
    states = [torch.load(path) for path in embeddings]
    torch.save({"word_embeddings.weight": states[1]["word_embeddings.weight"]}, embeddings[1])
    with pytest.raises(CheckpointError, match="layer_01-model_01-model_states.pt: its tensors differ from those "
                                              "of layer_01-model_00-model_states.pt"):
        convert(src, tmp_path / "out", options=ConvertOptions(config_file=bad))
    torch.save({"word_embeddings.weight": states[0]["word_embeddings.weight"]}, embeddings[0])
    with pytest.raises(CheckpointError, match="layer_01-model_00-model_states.pt: not a BLOOM pipeline layer "
                                              r"\(missing tensor 'word_embeddings.norm.bias'\)"):
        convert(src, tmp_path / "out", options=ConvertOptions(config_file=bad))
    for path, state in zip(embeddings, states):
        torch.save(state, path)
    (src / "layer_04-model_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="layer 04 lacks tensor-parallel rank 01"):
        convert(src, tmp_path / "out", from_format="bloom-megatron")
    (src / "layer_04-model_00-model_states.pt").write_bytes(b"not a pickle")
    (src / "layer_04-model_01-model_states.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="layer_04-model_00-model_states.pt: cannot be loaded safely"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
