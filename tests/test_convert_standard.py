"""Re-casting and re-sharding a standard folder; what lmtool writes loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GemmaForSequenceClassification

import lmtool
from lmtool.checkpoint import parse_size
from lmtool.convert import ConvertOptions, convert
from lmtool.errors import LmtoolError

from helpers import randomize, save_hf, tiny_gemma_config


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    config = tiny_gemma_config(id2label={0: "no", 1: "yes"})
    return save_hf(randomize(GemmaForSequenceClassification(config)), tmp_path_factory.mktemp("cls"))


def test_resharded_bfloat16_copy_loads_in_transformers_and_lmtool(classifier, tmp_path):
    out = tmp_path / "bf16"
    summary = convert(classifier, out, options=ConvertOptions(dtype=torch.bfloat16), max_shard_size=parse_size("20KB"))
    assert len(summary["shards"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s["file"] for s in summary["shards"]}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["GemmaForSequenceClassification"]
    assert config["id2label"] == {"0": "no", "1": "yes"}

    ids = torch.randint(3, 120, (2, 7))
    theirs = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    ours = lmtool.load(out, dtype="float32")
    with torch.no_grad():
        assert (theirs(ids).logits - ours.model(ids)).abs().max().item() <= 1e-4
    original = lmtool.load(classifier, dtype="float32")
    with torch.no_grad():  # bf16 rounding of the weights only
        assert (original.model(ids) - ours.model(ids)).abs().max().item() <= 0.1


def test_dry_run_writes_nothing_and_existing_output_is_refused(classifier, tmp_path):
    out = tmp_path / "out"
    summary = convert(classifier, out, dry_run=True)
    assert not out.exists() and summary["tensors"] > 0
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LmtoolError, match="already exists"):
        convert(classifier, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(classifier, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_interrupted_conversion_leaves_nothing(classifier, tmp_path, monkeypatch):
    import lmtool.checkpoint as checkpoint

    written = []
    real = checkpoint.write_safetensors

    def interrupted(path, tensors, metadata=None, on_tensor=None):
        written.append(path)
        tensors[len(tensors) // 2].produce = lambda: (_ for _ in ()).throw(KeyboardInterrupt())
        real(path, tensors, metadata, on_tensor)

    monkeypatch.setattr(checkpoint, "write_safetensors", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(classifier, out)
    assert written and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_question_answering_head_exists_for_gemma(classifier, tmp_path):
    """transformers has no GemmaForQuestionAnswering; lmtool's shared head still loads and saves."""
    config = json.loads((classifier / "config.json").read_text())
    model = lmtool.loading.build_model(
        lmtool.registry.get_family("gemma"), lmtool.families.gemma.GemmaConfig.from_dict(config),
        "question-answering",
    )
    assert model.head_name == "qa_outputs" and model.head.weight.shape == (2, 32)
    start, end = model(torch.randint(3, 120, (2, 5)))
    assert start.shape == end.shape == (2, 5)


def test_a_pytorch_model_bin_folder_converts_to_what_transformers_loads(tmp_path):
    """generate points at `lmtool convert` for a pytorch_model.bin folder: convert takes it."""
    from transformers import GemmaForCausalLM

    model = randomize(GemmaForCausalLM(tiny_gemma_config()))
    src = tmp_path / "bin"
    # As transformers 4 saved it (with the tied lm_head copy); transformers 5 writes safetensors only.
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(LmtoolError, match="found pytorch_model.bin: convert it"):
        lmtool.load(src)
    summary = convert(src, tmp_path / "out")
    assert summary["format"] == "transformers-bin"
    ids = torch.randint(3, 120, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        assert (lmtool.load(tmp_path / "out", dtype="float32").model(ids) - expected).abs().max().item() <= 1e-4


def test_missing_source_is_a_reference_that_cannot_be_resolved(tmp_path):
    from lmtool.errors import ExitCode

    with pytest.raises(LmtoolError, match="no such file or folder") as info:
        convert(tmp_path / "missing", tmp_path / "out")
    assert info.value.exit_code == ExitCode.NOT_FOUND
