"""`lmtool convert` from Gemma's original formats: gemma_pytorch .ckpt (plain, int8, sharded) and
the JAX/Flax orbax checkpoint. The source model is a random transformers GemmaForCausalLM written
in the original layout; the converted folder must give its logits in lmtool and in transformers."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from fixtures_gemma import (
    dequantized_model,
    gemma_pytorch_state_dict,
    quantize,
    reference_logits,
    save_ckpt,
    tiny_gemma,
    train_tokenizer,
)

import lmtool
from helpers import interrupt_midway
from lmtool.checkpoint import Checkpoint
from lmtool.convert import ConvertOptions, convert, find_converter
from lmtool.errors import CheckpointError, ConfigError, LmtoolError
from lmtool.families.gemma import FAMILY
from lmtool.families.gemma.convert import GemmaPytorchConverter, Shapes, matching_preset

IDS = torch.tensor([[2, 17, 100, 250, 7, 9, 300, 1, 45, 46], [2, 5, 5, 5, 319, 0, 3, 200, 201, 202]])
LAYOUTS = {"mqa": (4, 1), "mha": (4, 4), "gqa": (4, 2)}
TOLERANCE = 1e-5  # fp32


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def mqa(tmp_path_factory):
    """(source model, its gemma_pytorch .ckpt)."""
    model = tiny_gemma(kv_heads=1)
    path = save_ckpt(gemma_pytorch_state_dict(model), tmp_path_factory.mktemp("mqa") / "gemma-tiny.ckpt")
    return model, path


def lmtool_logits(folder) -> torch.Tensor:
    lm = lmtool.load(folder, device="cpu")
    with torch.no_grad():
        return lm.model(IDS)


def assert_transformers_agrees(folder, expected: torch.Tensor) -> float:
    """transformers loads the folder unchanged, with every key used, and gives the logits."""
    from transformers import GemmaForCausalLM

    model, info = GemmaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    diff = (reference_logits(model.eval(), IDS) - expected).abs().max().item()
    assert diff <= TOLERANCE
    return diff


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ckpt_converts_to_the_same_model(tmp_path, tokenizer_model, layout):
    heads, kv_heads = LAYOUTS[layout]
    model = tiny_gemma(heads=heads, kv_heads=kv_heads, seed=heads + kv_heads)
    ckpt = save_ckpt(gemma_pytorch_state_dict(model), tmp_path / "model.ckpt")
    out = tmp_path / "out"
    summary = convert(ckpt, out, options=ConvertOptions(tokenizer=tokenizer_model))
    assert summary["format"] == "gemma-pytorch"  # detected, not named
    expected = reference_logits(model, IDS)
    diff = (lmtool_logits(out) - expected).abs().max().item()
    print(f"{layout}: max|dlogit| lmtool {diff:.2e}, transformers {assert_transformers_agrees(out, expected):.2e}")
    assert diff <= TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, kv_heads, 16)
    assert config["max_position_embeddings"] == 64  # from freqs_cis: 2 * 64 rows
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"
    ]
    assert not any(k.startswith(("embedder", "freqs")) or "qkv" in k for k in Checkpoint(out).keys())


def test_int8_ckpt_is_dequantized(tmp_path, mqa):
    model, _ = mqa
    quantized = quantize(gemma_pytorch_state_dict(model))
    ckpt = save_ckpt(quantized, tmp_path / "int8.ckpt")
    out = tmp_path / "out"
    summary = convert(ckpt, out)
    assert any("dequantized" in note for note in summary["notes"])
    assert {info.dtype for info in Checkpoint(out).infos()} == {torch.float32}
    expected = reference_logits(dequantized_model(tiny_gemma(kv_heads=1), quantized), IDS)
    diff = (lmtool_logits(out) - expected).abs().max().item()
    print(f"int8: max|dlogit| lmtool {diff:.2e}, transformers {assert_transformers_agrees(out, expected):.2e}")
    assert diff <= TOLERANCE
    # The int8 rounding is real: the dequantized model is not the float one.
    assert (expected - reference_logits(model, IDS)).abs().max() > 1e-3

    convert(ckpt, tmp_path / "bf16", options=ConvertOptions(dtype=torch.bfloat16))
    assert {info.dtype for info in Checkpoint(tmp_path / "bf16").infos()} == {torch.bfloat16}


def test_sharded_folder_of_bare_state_dicts(tmp_path, mqa):
    model, _ = mqa
    sd = gemma_pytorch_state_dict(model)
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({k: sd[k] for k in names}, folder / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert convert(folder, out)["format"] == "gemma-pytorch"
    assert (lmtool_logits(out) - reference_logits(model, IDS)).abs().max() <= TOLERANCE


def test_tokenizer_beside_the_checkpoint_is_used_and_its_absence_noted(tmp_path, mqa, tokenizer_model):
    _, ckpt = mqa
    summary = convert(ckpt, None, dry_run=True)
    assert any("has none" in note for note in summary["notes"]) and "tokenizer.json" not in summary["files"]
    beside = tmp_path / "release"
    beside.mkdir()
    (beside / "model.ckpt").write_bytes(ckpt.read_bytes())
    (beside / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    summary = convert(beside / "model.ckpt", None, dry_run=True)
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(summary["files"])


# --- the driver's guarantees, through this converter ----------------------------------------------


def test_dry_run_writes_nothing(tmp_path, mqa):
    _, ckpt = mqa
    summary = convert(ckpt, tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert summary["tensors"] == 1 + 2 * 9 + 1 and summary["shards"][0]["file"] == "model.safetensors"


def test_existing_output_is_refused_without_force(tmp_path, mqa):
    _, ckpt = mqa
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LmtoolError, match="already exists"):
        convert(ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_interrupted_conversion_leaves_nothing(tmp_path, mqa, monkeypatch):
    _, ckpt = mqa
    interrupt_midway(monkeypatch, GemmaPytorchConverter)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


# --- config inference -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def without_freqs(tmp_path_factory):
    """A checkpoint whose shapes do not tell the head count: freqs_cis removed, GQA 4/2."""
    model = tiny_gemma(heads=4, kv_heads=2, seed=3)
    sd = gemma_pytorch_state_dict(model)
    del sd["freqs_cis"]
    return model, save_ckpt(sd, tmp_path_factory.mktemp("nofreqs") / "model.ckpt")


def test_unknown_head_count_asks_for_config(tmp_path, without_freqs):
    _, ckpt = without_freqs
    with pytest.raises(ConfigError) as err:
        convert(ckpt, tmp_path / "out")
    assert "--config" in str(err.value) and str(ckpt) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_config_file_gives_the_head_count(tmp_path, without_freqs):
    model, ckpt = without_freqs
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"num_attention_heads": 4, "head_dim": 16, "max_position_embeddings": 64}))
    out = tmp_path / "out"
    convert(ckpt, out, options=ConvertOptions(config_file=config_file))
    assert (lmtool_logits(out) - reference_logits(model, IDS)).abs().max() <= TOLERANCE
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def test_config_file_that_contradicts_the_weights_is_refused(tmp_path, mqa):
    _, ckpt = mqa
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"hidden_size": 2048}))
    with pytest.raises(ConfigError, match="'hidden_size' is 2048, but the checkpoint has 64"):
        convert(ckpt, None, options=ConvertOptions(config_file=config_file), dry_run=True)


def test_released_sizes_are_recognised_by_shape(tmp_path, without_freqs, monkeypatch):
    assert matching_preset(Shapes(256000, 2048, 16384, 18, 8 * 256, 256))[0] == "gemma-2b"
    assert matching_preset(Shapes(256000, 3072, 24576, 28, 16 * 256, 16 * 256))[0] == "gemma-7b"
    assert matching_preset(Shapes(256000, 3072, 24576, 28, 8 * 256, 256)) is None
    # Through a conversion: a preset with the tiny shapes stands in for a released size.
    tiny = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    monkeypatch.setitem(FAMILY.presets, "gemma-tiny", tiny)
    model, ckpt = without_freqs
    summary = convert(ckpt, tmp_path / "out", options=ConvertOptions())
    assert any("gemma-tiny" in note for note in summary["notes"])
    assert (lmtool_logits(tmp_path / "out") - reference_logits(model, IDS)).abs().max() <= TOLERANCE


def test_freqs_cis_of_another_rope_theta_is_caught(tmp_path):
    model = tiny_gemma(kv_heads=1)
    ckpt = save_ckpt(gemma_pytorch_state_dict(model, theta=500.0), tmp_path / "model.ckpt")
    with pytest.raises(ConfigError, match="rope theta ~500"):
        convert(ckpt, None, dry_run=True)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"rope_theta": 500.0}))
    convert(ckpt, None, options=ConvertOptions(config_file=config_file), dry_run=True)


# --- unreadable and unsafe files --------------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_pickle_with_code_is_never_run(tmp_path, monkeypatch, mqa):
    monkeypatch.chdir(tmp_path)
    model, _ = mqa
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": gemma_pytorch_state_dict(model), "extra": Payload()}, ckpt)
    with pytest.raises(CheckpointError) as err:
        convert(ckpt, tmp_path / "out", from_format="gemma-pytorch")
    assert str(err.value).startswith(str(ckpt)) and "weights_only" in str(err.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"hello " * 100])
def test_a_damaged_file_is_one_line(tmp_path, content):
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        convert(ckpt, tmp_path / "out", from_format="gemma-pytorch")
    assert str(err.value).startswith(str(ckpt)) and "\n" not in str(err.value)


def test_other_state_dicts_are_not_taken_for_gemma(tmp_path, mqa):
    _, ckpt = mqa
    assert GemmaPytorchConverter().detect(ckpt)
    other = tmp_path / "other.ckpt"
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    assert not GemmaPytorchConverter().detect(other)
    with pytest.raises(CheckpointError, match="no tensor 'embedder.weight'"):
        convert(other, None, from_format="gemma-pytorch", dry_run=True)


def test_unexpected_tensors_are_refused(tmp_path, mqa):
    model, _ = mqa
    sd = gemma_pytorch_state_dict(model)
    sd["model.layers.0.self_attn.query_norm.weight"] = torch.ones(16)  # a Gemma 3 key
    ckpt = save_ckpt(sd, tmp_path / "g3.ckpt")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.query_norm.weight'"):
        convert(ckpt, None, dry_run=True)


# --- orbax (JAX/Flax) ---------------------------------------------------------------------------------


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "flax"
    folder.mkdir()
    (folder / "_METADATA").write_text('{"tree_metadata": {"transformer/embedder": {}}}')
    assert find_converter(folder, None).name == "gemma-orbax"
    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(LmtoolError) as err:
        convert(folder, tmp_path / "out")
    assert "pip install 'lmtool[orbax]'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("layout", ["mqa", "mha"])
def test_orbax_converts_to_the_same_model(tmp_path, tokenizer_model, layout):
    pytest.importorskip("orbax.checkpoint")
    from fixtures_gemma import orbax_tree, save_orbax

    heads, kv_heads = LAYOUTS[layout]
    model = tiny_gemma(heads=heads, kv_heads=kv_heads, seed=11)
    release = tmp_path / "gemma-tiny-flax"  # Kaggle's layout: the checkpoint folder and tokenizer.model
    release.mkdir()
    save_orbax(orbax_tree(model, padded_rows=384), release / "tiny")
    (release / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    out = tmp_path / "out"
    summary = convert(release, out)
    assert summary["format"] == "gemma-orbax"
    assert any("320..383 (padding) dropped" in note for note in summary["notes"])
    expected = reference_logits(model, IDS)
    diff = (lmtool_logits(out) - expected).abs().max().item()
    print(f"orbax {layout}: max|dlogit| lmtool {diff:.2e}, transformers {assert_transformers_agrees(out, expected):.2e}")
    assert diff <= TOLERANCE
    assert (out / "tokenizer.json").is_file()


def test_orbax_fixture_follows_the_flax_einsums():
    """The fixture's einsum weights, applied the way the Flax Gemma code applies them, give the
    source model's projections (so the converter is checked against the format, not its inverse)."""
    from fixtures_gemma import orbax_tree

    model = tiny_gemma(heads=4, kv_heads=1, seed=5)
    tree = {k: {leaf: torch.from_numpy(v) for leaf, v in d.items()} for k, d in orbax_tree(model, 330).items()}
    layer, attn, mlp = tree, model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, 64)
    q = torch.einsum("td,ndh->tnh", x, layer["transformer/layer_0/attn/q_einsum"]["w"])
    k = torch.einsum("td,cndh->ctnh", x, layer["transformer/layer_0/attn/kv_einsum"]["w"])[0]
    assert torch.allclose(q.reshape(3, -1), attn.q_proj(x), atol=1e-5)
    assert torch.allclose(k.reshape(3, -1), attn.k_proj(x), atol=1e-5)
    heads_out = torch.randn(3, 4, 16)
    o = torch.einsum("tnh,nhd->td", heads_out, layer["transformer/layer_0/attn/attn_vec_einsum"]["w"])
    assert torch.allclose(o, attn.o_proj(heads_out.reshape(3, -1)), atol=1e-5)
    gate, up = torch.einsum("td,cdf->ctf", x, layer["transformer/layer_0/mlp/gating_einsum"]["w"])
    assert torch.allclose(gate, mlp.gate_proj(x), atol=1e-5) and torch.allclose(up, mlp.up_proj(x), atol=1e-5)
    hidden = torch.randn(3, 96)
    down = torch.einsum("tf,fd->td", hidden, layer["transformer/layer_0/mlp/linear"]["w"])
    assert torch.allclose(down, mlp.down_proj(hidden), atol=1e-5)


def test_config_head_count_that_contradicts_freqs_cis_is_refused(tmp_path, mqa):
    _, ckpt = mqa
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"num_attention_heads": 8}))  # head_dim 8, freqs_cis says 16
    with pytest.raises(ConfigError, match="head_dim would be 8, but the checkpoint has 16"):
        convert(ckpt, None, options=ConvertOptions(config_file=config_file), dry_run=True)
