"""`lmtool convert` from RecurrentGemma's original formats: the authors' bare `.pt` state dict and
their JAX/Flax orbax folder. The source is a random transformers RecurrentGemmaForCausalLM, copied
into the authors' torch Griffin (tests/griffin_oracle.py) whose state_dict is saved as the `.pt`;
the converted folder must give transformers' logits in transformers (prompts within the window)
and the authors' logits and greedy tokens in lmtool (prompts several windows long)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from fixtures_gemma import gemma_pytorch_state_dict, save_ckpt, tiny_gemma, train_tokenizer
from griffin_oracle import (
    griffin_config,
    griffin_from_hf,
    griffin_greedy,
    griffin_logits,
    griffin_modules,
    hf_to_griffin_state,
)
from helpers import interrupt_midway, randomize, run_cli

import lmtool
from lmtool.checkpoint import Checkpoint
from lmtool.convert import ConvertOptions, convert, find_converter
from lmtool.errors import CheckpointError, ConfigError, LmtoolError
from lmtool.families.gemma.convert import GemmaOrbaxConverter, GemmaPytorchConverter
from lmtool.families.recurrent_gemma import FAMILY
from lmtool.families.recurrent_gemma.convert import (
    Layout,
    RecurrentGemmaPytorchConverter,
    block_pattern,
    matching_preset,
)
from lmtool.generation import SamplingParams, generate

os.environ.setdefault("JAX_PLATFORMS", "cpu")

WINDOW = 8
TOLERANCE = 1e-4  # fp32
# Two prompts within the window (transformers' window is one key shorter than the authors').
SHORT = torch.tensor([[2, 17, 100, 250, 7, 9, 300, 1], [2, 5, 5, 5, 319, 0, 3, 200]])
LONG = torch.randint(3, 320, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
LAYOUTS = {
    # (recurrent, recurrent, attention) cycled over 5 blocks: the pattern is not a whole number of cycles.
    "5-blocks": dict(num_hidden_layers=5, conv1d_width=4, lru_width=48),
    # Conv width 3, an RG-LRU wider than the model.
    "conv3-lru64": dict(num_hidden_layers=4, conv1d_width=3, lru_width=64),
}


def tiny_hf(seed: int = 0, **changes):
    """A random fp32 transformers RecurrentGemmaForCausalLM (every parameter random)."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    values = dict(
        vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=1, lru_width=48, attention_window_size=WINDOW, conv1d_width=4,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    values.update(changes)
    torch.manual_seed(seed)
    return randomize(RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**values)))


def window_config(folder) -> ConvertOptions:
    """--config with what the tensors cannot tell: the tiny model's attention window."""
    path = folder / "window.json"
    path.write_text(json.dumps({"attention_window_size": WINDOW}))
    return ConvertOptions(config_file=path)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def griffin_with_conv_width(hf):
    """griffin_from_hf for another conv width: the authors' Griffin always builds width-4 convs
    (GriffinConfig has no field for it), but their Conv1D takes any temporal width."""
    _, rgt = griffin_modules()
    from recurrentgemma.torch import layers

    config = hf.config
    model = rgt.Griffin(griffin_config(config), gradient_checkpointing=False, device="cpu", dtype=torch.float32)
    for block in model.blocks:
        if hasattr(block, "recurrent_block"):
            block.recurrent_block.conv_1d = layers.Conv1D(
                width=config.lru_width, temporal_width=config.conv1d_width, device="cpu", dtype=torch.float32
            )
    model.load_state_dict(hf_to_griffin_state(hf.state_dict(), config), strict=True)
    return model.eval()


def make_release(folder, tokenizer_model, **changes):
    """(transformers model, the authors' Griffin with its weights, its saved .pt with
    tokenizer.model beside it)."""
    hf = tiny_hf(**changes)
    griffin = griffin_from_hf(hf) if hf.config.conv1d_width == 4 else griffin_with_conv_width(hf)
    folder.mkdir(parents=True, exist_ok=True)
    pt = folder / "tiny.pt"
    torch.save(griffin.state_dict(), pt)  # what the authors' release is: a bare state dict
    (folder / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    return hf, griffin, pt


@pytest.fixture(scope="module")
def release(tmp_path_factory, tokenizer_model):
    return make_release(tmp_path_factory.mktemp("release"), tokenizer_model, **LAYOUTS["5-blocks"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release):
    """The release converted by the library (format detected), with --config giving the window."""
    _, _, pt = release
    tmp = tmp_path_factory.mktemp("converted")
    out = tmp / "out"
    summary = convert(pt, out, options=window_config(tmp))
    return out, summary


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def lmtool_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    lm = lmtool.load(folder, device="cpu")
    with torch.no_grad():
        return lm.model(ids)


def assert_transformers_agrees(folder, source) -> float:
    """transformers loads the folder unchanged, with every key used, and gives the source's logits."""
    from transformers import RecurrentGemmaForCausalLM

    model, info = RecurrentGemmaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    diff = (hf_logits(model.eval(), SHORT) - hf_logits(source, SHORT)).abs().max().item()
    assert diff <= TOLERANCE
    return diff


def tensors(folder) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(folder)
    return {name: checkpoint.tensor(name) for name in checkpoint.keys()}


# --- .pt -------------------------------------------------------------------------------------------


def test_pt_converts_to_the_authors_model(release, converted):
    hf, griffin, _ = release
    out, summary = converted
    assert summary["format"] == "recurrentgemma-pytorch"  # detected, not named
    assert any("tokenizer from" in note for note in summary["notes"])
    # --config gave the window; the soft cap is the default.
    assert "not in the weights, defaults used: logits_soft_cap 30.0 (pass --config to set them)" in summary["notes"]
    diff_hf = assert_transformers_agrees(out, hf)
    # lmtool follows the authors' window (window + 1 keys): equal to their model past the window.
    diff = (lmtool_logits(out, LONG) - griffin_logits(griffin, LONG)).abs().max().item()
    print(f"max|dlogit| transformers {diff_hf:.2e}, lmtool vs the authors over 3 windows {diff:.2e}")
    assert diff <= TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["RecurrentGemmaForCausalLM"] and config["model_type"] == "recurrent_gemma"
    assert config["block_types"] == ["recurrent", "recurrent", "attention"]
    expected = dict(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=1, lru_width=48, conv1d_width=4, attention_window_size=WINDOW,
                    logits_soft_cap=30.0, dtype="float32")
    assert {k: config[k] for k in expected} == expected
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"
    ]
    keys = set(Checkpoint(out).keys())
    assert "lm_head.weight" not in keys and "model.final_norm.weight" in keys
    assert keys == set(hf.state_dict()) - {"lm_head.weight"}


def test_other_layout_converts_to_the_authors_model(tmp_path, tokenizer_model):
    """Conv width 3, lru_width != hidden_size, 4 blocks (recurrent, recurrent, attention, recurrent)."""
    hf, griffin, pt = make_release(tmp_path / "release", tokenizer_model, **LAYOUTS["conv3-lru64"])
    out = tmp_path / "out"
    convert(pt, out, options=window_config(tmp_path))
    config = json.loads((out / "config.json").read_text())
    assert (config["conv1d_width"], config["lru_width"], config["num_hidden_layers"]) == (3, 64, 4)
    assert config["block_types"] == ["recurrent", "recurrent", "attention"]
    assert_transformers_agrees(out, hf)
    assert (lmtool_logits(out, LONG) - griffin_logits(griffin, LONG)).abs().max() <= TOLERANCE


def test_cli_convert_with_from_writes_the_same_folder(tmp_path, release, converted, capsys):
    _, _, pt = release
    out = tmp_path / "cli"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"sliding_window": WINDOW}))  # transformers' alias is understood
    code, stdout, err = run_cli(capsys, "convert", "--from", "recurrentgemma-pytorch", str(pt), str(out),
                                "--config", str(config))
    assert code == 0, err
    assert stdout.strip() == str(out) and "recurrentgemma-pytorch -> recurrent_gemma" in err
    reference, written = tensors(converted[0]), tensors(out)
    assert reference.keys() == written.keys() and all(torch.equal(reference[k], written[k]) for k in reference)
    assert json.loads((out / "config.json").read_text())["attention_window_size"] == WINDOW


def test_greedy_generation_matches_the_authors(release, converted):
    _, griffin, _ = release
    lm = lmtool.load(converted[0], device="cpu")
    prompt = [2, 17, 100, 250, 7]
    completions, _ = generate(lm.model, [prompt], max_new_tokens=20, params=SamplingParams(temperature=0),
                              seed=0, eos_ids=[1], ignore_eos=True)
    expected = griffin_greedy(griffin, prompt, 20)
    assert completions[0].token_ids == expected
    assert len(set(expected)) > 1  # not a degenerate repetition of one token


def test_bfloat16_output(tmp_path, release, converted, capsys):
    _, _, pt = release
    out = tmp_path / "bf16"
    code, _, err = run_cli(capsys, "convert", str(pt), str(out), "--dtype", "bfloat16", "--config",
                           str(window_config(tmp_path).config_file))
    assert code == 0, err
    written, reference = tensors(out), tensors(converted[0])
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert all(torch.equal(written[k], reference[k].to(torch.bfloat16)) for k in reference)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    logits = lmtool_logits(out, SHORT).float()
    diff = (logits - lmtool_logits(converted[0], SHORT)).abs().max().item()
    assert torch.isfinite(logits).all() and diff < 2.0, diff  # bf16 rounding only (logits capped at 30)


# --- config from the shapes, a released size, or --config ----------------------------------------------


def test_window_and_soft_cap_default_with_a_note(release):
    _, _, pt = release
    summary = convert(pt, None, dry_run=True)
    assert any("attention_window_size 2048" in note and "logits_soft_cap 30.0" in note for note in summary["notes"])
    assert summary["tensors"] == 1 + 4 * 21 + 13 + 1  # 4 recurrent blocks, 1 attention block


def test_a_released_size_gives_window_and_soft_cap(tmp_path, release, monkeypatch):
    """A preset with the tiny shapes stands in for recurrentgemma-2b: the values the tensors do not
    hold come from it."""
    _, _, pt = release
    tiny = dict(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=1, lru_width=48, attention_window_size=WINDOW, conv1d_width=4,
                logits_soft_cap=20.0)
    monkeypatch.setitem(FAMILY.presets, "recurrentgemma-tiny", tiny)
    out = tmp_path / "out"
    summary = convert(pt, out)
    assert any("from the released recurrentgemma-tiny size" in note for note in summary["notes"])
    config = json.loads((out / "config.json").read_text())
    assert (config["attention_window_size"], config["logits_soft_cap"]) == (WINDOW, 20.0)


def test_released_sizes_are_recognised_by_shape():
    r, a = "recurrent", "attention"

    def layout(hidden, layers, heads, **changes):
        values = dict(embedding_rows=256000, hidden_size=hidden, mlp_width=3 * hidden,
                      layer_types=[(r, r, a)[i % 3] for i in range(layers)], lru_width=hidden,
                      num_attention_heads=heads, conv1d_width=4, kv_width=hidden // heads)
        return Layout(**{**values, **changes})

    assert matching_preset(layout(2560, 26, 10))[0] == "recurrentgemma-2b"
    assert matching_preset(layout(4096, 38, 16))[0] == "recurrentgemma-9b"
    assert matching_preset(layout(2560, 26, 8)) is None
    assert matching_preset(layout(2560, 26, 10, layer_types=[r, a] * 13)) is None
    assert matching_preset(layout(2560, 26, 10, embedding_rows=1000)) is None


def test_transformers_config_json_is_accepted(tmp_path, release):
    """The config.json transformers writes for the model (head_dim, rope_parameters, ...) is a
    valid --config: it agrees with the tensors and gives the window and the soft cap."""
    hf, _, pt = release
    hf.config.save_pretrained(tmp_path / "hub")
    out = tmp_path / "out"
    summary = convert(pt, out, options=ConvertOptions(config_file=tmp_path / "hub" / "config.json"))
    assert not any("defaults used" in note for note in summary["notes"])
    config = json.loads((out / "config.json").read_text())
    assert (config["attention_window_size"], config["logits_soft_cap"]) == (WINDOW, 30.0)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def test_block_pattern_is_the_shortest_cycle():
    r, a = "recurrent", "attention"
    assert block_pattern([r, r, a, r, r, a, r, r]) == [r, r, a]
    assert block_pattern([r, r, a, r, r]) == [r, r, a]
    assert block_pattern([a, a, a]) == [a]
    assert block_pattern([r, a, a, r]) == [r, a, a]
    assert block_pattern([r, a, a, a]) == [r, a, a, a]


def test_config_block_types_are_checked_against_the_blocks(tmp_path, release):
    _, _, pt = release
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_block_types": ["recurrent", "attention"]}))
    with pytest.raises(ConfigError) as err:
        convert(pt, None, options=ConvertOptions(config_file=config), dry_run=True)
    assert str(err.value).startswith(str(config)) and "'block_types'" in str(err.value)
    # A longer pattern that cycles to the same blocks is kept as given.
    six = ["recurrent", "recurrent", "attention"] * 2
    config.write_text(json.dumps({"block_types": six, "attention_window_size": WINDOW}))
    convert(pt, tmp_path / "out", options=ConvertOptions(config_file=config))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["block_types"] == six


def test_config_that_contradicts_the_weights_is_one_line(tmp_path, release, capsys):
    _, _, pt = release
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 64}))
    code, _, err = run_cli(capsys, "convert", str(pt), str(tmp_path / "out"), "--config", str(config))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{config}: 'hidden_size' is 64, but the checkpoint has 48" in err
    assert not (tmp_path / "out").exists()
    config.write_text(json.dumps({"num_attention_heads": 8}))  # the RG-LRU gates have 4 blocks
    with pytest.raises(ConfigError, match="'num_attention_heads' is 8, but the checkpoint has 4"):
        convert(pt, None, options=ConvertOptions(config_file=config), dry_run=True)


# --- orbax --------------------------------------------------------------------------------------------


def orbax_tree(state: dict[str, torch.Tensor]) -> dict:
    """The authors' torch state dict as their Flax params tree (recurrentgemma.conversion's
    mapping, inverted): `blocks.N` keys keep their dot, Dense layers hold kernel = weight.T."""
    tree: dict = {}
    for key, value in state.items():
        prefix, rest = ("blocks." + key.split(".")[1], key.split(".")[2:]) if key.startswith("blocks.") else (
            key.split(".")[0], key.split(".")[1:])
        array = value.detach().float().numpy()
        if rest[-1] == "weight":  # nn.Linear (out, in) -> nn.Dense kernel (in, out)
            rest, array = [*rest[:-1], "kernel"], array.T
        node = tree.setdefault(prefix, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = array.copy()
    return {"params": tree}


@pytest.fixture(scope="module")
def orbax_release(tmp_path_factory, release, tokenizer_model):
    """Kaggle's Flax layout: `release/tiny/` (the orbax folder) beside tokenizer.model."""
    ocp = pytest.importorskip("orbax.checkpoint")
    _, griffin, _ = release
    folder = tmp_path_factory.mktemp("flax")
    ocp.PyTreeCheckpointer().save((folder / "tiny").resolve(), orbax_tree(griffin.state_dict()))
    (folder / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    return folder


def test_orbax_converts_to_the_same_tensors(tmp_path, orbax_release, converted):
    out = tmp_path / "out"
    summary = convert(orbax_release, out, options=window_config(tmp_path))
    assert summary["format"] == "recurrentgemma-orbax"
    reference, written = tensors(converted[0]), tensors(out)
    assert reference.keys() == written.keys()
    assert all(torch.equal(reference[k], written[k]) for k in reference)
    assert (out / "config.json").read_text() == (converted[0] / "config.json").read_text()
    assert (out / "tokenizer.json").read_bytes() == (converted[0] / "tokenizer.json").read_bytes()


def test_orbax_fixture_is_the_authors_layout(release):
    """The fixture's tree has the names recurrentgemma.jax's modules give their parameters."""
    _, griffin, _ = release
    params = orbax_tree(griffin.state_dict())["params"]
    assert set(params) == {"embedder", "final_norm", *(f"blocks.{i}" for i in range(5))}
    assert set(params["blocks.0"]["recurrent_block"]) == {"linear_x", "linear_y", "linear_out", "conv_1d", "rg_lru"}
    assert set(params["blocks.0"]["recurrent_block"]["linear_x"]) == {"kernel", "bias"}
    assert params["blocks.0"]["recurrent_block"]["linear_out"]["kernel"].shape == (48, 48)
    assert set(params["blocks.0"]["recurrent_block"]["rg_lru"]) == {"a_param", "input_gate", "a_gate"}
    assert set(params["blocks.2"]["attention_block"]) == {"proj_q", "proj_k", "proj_v", "proj_final"}
    assert params["blocks.2"]["attention_block"]["proj_k"]["kernel"].shape == (48, 12)  # (in, one head)
    assert params["blocks.0"]["mlp_block"]["ffw_up"]["w"].shape == (2, 48, 48)
    assert params["blocks.0"]["mlp_block"]["ffw_down"]["kernel"].shape == (48, 48)


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "flax"
    folder.mkdir()
    (folder / "_METADATA").write_text('{"tree_metadata": {"(\'params\', \'embedder\', \'input_embedding\')": {}, '
                                      '"(\'params\', \'blocks.0\', \'recurrent_block\')": {}}}')
    assert find_converter(folder, None).name == "recurrentgemma-orbax"
    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(LmtoolError) as err:
        convert(folder, tmp_path / "out")
    assert "pip install 'lmtool[orbax]'" in str(err.value) and "\n" not in str(err.value)


# --- detection ------------------------------------------------------------------------------------------


def test_detection_picks_the_right_converter(tmp_path, release, orbax_release):
    _, _, pt = release
    assert find_converter(pt, None).name == "recurrentgemma-pytorch"
    assert find_converter(pt.parent, None).name == "recurrentgemma-pytorch"  # the release folder, one .pt
    assert find_converter(orbax_release, None).name == "recurrentgemma-orbax"
    assert find_converter(orbax_release / "tiny", None).name == "recurrentgemma-orbax"
    # Gemma's converters do not claim them ...
    assert not GemmaPytorchConverter().detect(pt) and not GemmaOrbaxConverter().detect(orbax_release)
    # ... nor these Gemma's.
    gemma = save_ckpt(gemma_pytorch_state_dict(tiny_gemma()), tmp_path / "gemma.ckpt")
    assert find_converter(gemma, None).name == "gemma-pytorch"
    flax = tmp_path / "gemma-flax"
    flax.mkdir()
    (flax / "_METADATA").write_text('{"tree_metadata": {"transformer/embedder": {}}}')
    assert find_converter(flax, None).name == "gemma-orbax"
    with pytest.raises(CheckpointError, match="no tensor 'embedder.input_embedding'"):
        convert(gemma, None, from_format="recurrentgemma-pytorch", dry_run=True)


# --- bad input -------------------------------------------------------------------------------------------


def broken_release(tmp_path, release, change) -> str:
    hf, _, _ = release
    state = hf_to_griffin_state(hf.state_dict(), hf.config)
    change(state)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    return str(path)


def test_missing_tensor_is_one_line(tmp_path, release, capsys):
    path = broken_release(tmp_path, release, lambda sd: sd.pop("blocks.2.attention_block.proj_v.weight"))
    code, _, err = run_cli(capsys, "convert", path, str(tmp_path / "out"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{path}: no tensor 'blocks.2.attention_block.proj_v.weight'" in err
    assert not (tmp_path / "out").exists()


def test_misnumbered_blocks_are_refused(tmp_path, release):
    def renumber(sd):
        for key in [k for k in sd if k.startswith("blocks.4.")]:
            sd[key.replace("blocks.4.", "blocks.6.")] = sd.pop(key)

    path = broken_release(tmp_path, release, renumber)
    with pytest.raises(CheckpointError, match=r"blocks are missing or misnumbered \(\[0, 1, 2, 3, 6\]\)"):
        convert(path, None, dry_run=True)


def test_wrong_shapes_and_extra_tensors_are_refused(tmp_path, release):
    def narrow(sd):
        sd["blocks.3.recurrent_block.linear_x.weight"] = sd["blocks.3.recurrent_block.linear_x.weight"][:40]

    shape = r"'blocks.3.recurrent_block.linear_x.weight' has shape \(40, 48\), expected \(48, 48\)"
    with pytest.raises(CheckpointError, match=shape):
        convert(broken_release(tmp_path, release, narrow), None, dry_run=True)

    def extra(sd):
        sd["blocks.0.recurrent_block.rg_lru.a_imag_param"] = torch.zeros(48)

    with pytest.raises(CheckpointError, match="unexpected tensor 'blocks.0.recurrent_block.rg_lru.a_imag_param'"):
        convert(broken_release(tmp_path, release, extra), None, dry_run=True)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"hello " * 100])
def test_a_damaged_file_is_one_line(tmp_path, content, capsys):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "convert", "--from", "recurrentgemma-pytorch", str(path), str(tmp_path / "out"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"error: {path}: " in err


def test_interrupted_conversion_leaves_nothing(tmp_path, release, monkeypatch):
    _, _, pt = release
    interrupt_midway(monkeypatch, RecurrentGemmaPytorchConverter)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert(pt, out_parent / "out")
    assert list(out_parent.iterdir()) == []  # no output, no temporary folder


def test_inspect_describes_the_original_checkpoints(release, orbax_release, capsys):
    """inspect reads the authors' .pt and orbax folder through their conversion plans: family,
    block pattern, window (the default here, noted), and the tensors the output would have."""
    _, _, pt = release
    for source in (pt, orbax_release):
        code, out, err = run_cli(capsys, "inspect", str(source), "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["family"] == "recurrent_gemma"
        assert result["structure"]["block pattern"].startswith("recurrent, recurrent, attention")
        assert "window 2048" in result["structure"]["attention"]
        assert any("2048" in note for note in result["notes"])
        assert result["config"]["num_hidden_layers"] == 5
