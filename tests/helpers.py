"""Builders of tiny checkpoints and tokenizers for tests (all offline, all random)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import lmtool

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "Simple is better than complex. Complex is better than complicated.",
    "Readability counts, and errors should never pass silently.",
    "Zürich, Kraków and São Paulo are cities; naïve café façade.",
    "1234567890 + 42 = 1234567932",
]


def gemma_style_tokenizer(vocab_size: int = 120) -> Tokenizer:
    """A small BPE with Gemma's conventions: '▁' for spaces, no dummy prefix, pad/eos/bos/unk = 0..3."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    return tok


def save_tokenizer(folder: Path, tok: Tokenizer, add_bos: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": add_bos,
                "add_eos_token": False,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (transformers zero-inits norms, which would hide norm bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def tiny_gemma_config(**overrides):
    from transformers import GemmaConfig

    values = dict(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )
    values.update(overrides)
    return GemmaConfig(**values)


def save_hf(model, folder: Path, tokenizer: Tokenizer | None = None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        save_tokenizer(folder, tokenizer)
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `lmtool ARGS` in this process; return (exit code, stdout, stderr)."""
    from lmtool.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cached_vs_full(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |Δ| at real tokens between a full forward and the same tokens fed through the cache
    as a prefill, a 2-token chunk, then single tokens (ids: a left-padded batch of width 10)."""
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.make_cache(ids.shape[0], 16)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        steps.append(model(ids[:, 6:8], attention_mask=mask[:, 6:8], cache=cache))
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(8, 10)]
        cached = torch.cat(steps, dim=1)
    return (cached - full)[mask.bool()].abs().max().item()


def padded_batch(vocab: int, lengths=(9, 6, 3), pad: int = 0, first_id: int = 3):
    """Random ids (first_id..vocab-1: no special token), left-padded with `pad`, and the mask."""
    width = max(lengths)
    ids = torch.randint(first_id, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        ids[row, : width - n] = pad
    return ids, mask


def interrupt_midway(monkeypatch, converter_class) -> None:
    """Make converter_class's plans raise KeyboardInterrupt halfway through writing tensors."""
    original = converter_class.plan

    def failing_plan(self, src, options):
        plan = original(self, src, options)

        def fail():
            raise KeyboardInterrupt

        plan.tensors[len(plan.tensors) // 2].produce = fail
        return plan

    monkeypatch.setattr(converter_class, "plan", failing_plan)


TASK_CLASS_SUFFIX = {
    "sequence-classification": "SequenceClassification",
    "token-classification": "TokenClassification",
    "question-answering": "QuestionAnswering",
}


def generic_head_classes(pretrained_base, own: dict | None = None) -> dict:
    """transformers' class for each task head of a family: its own where it has one (`own`),
    else transformers' generic head over the family's PreTrainedModel, which is what fine-tuning
    code builds for it."""
    from transformers import modeling_layers

    classes = {
        task: type(f"{pretrained_base.__name__}For{suffix}",
                   (getattr(modeling_layers, "GenericFor" + suffix), pretrained_base), {})
        for task, suffix in TASK_CLASS_SUFFIX.items()
    }
    classes.update(own or {})
    return classes


def name_architecture(folder: Path, prefix: str, task: str) -> None:
    """Write the family's class name for the task into folder/config.json (save_pretrained wrote
    the generic class's)."""
    written = json.loads((folder / "config.json").read_text())
    written["architectures"] = [f"{prefix}For{TASK_CLASS_SUFFIX[task]}"]
    (folder / "config.json").write_text(json.dumps(written))


def kernel_tolerance(dtype: torch.dtype, expected: torch.Tensor) -> float:
    """How far a native kernel's output may be from PyTorch's float32 result: float32, a few ulp of
    float32 arithmetic; bfloat16, about one bfloat16 rounding of the output."""
    scale = expected.abs().max().item() + 1
    return 1e-5 * scale if dtype == torch.float32 else 1e-2 * scale


def other_instruction_sets() -> list[str]:
    """The kernel builds this CPU runs besides the one it picks (LMTOOL_ISA caps the choice)."""
    from lmtool import kernels

    return [isa.name for isa in kernels.ISAS if kernels.runs_here(isa) and isa is not kernels.cpu_isa()]


def rerun_tests_on_instruction_set(test_file: str, isa: str) -> None:
    """Run test_file's other tests again in a process capped to isa's kernel build."""
    env = {**os.environ, "LMTOOL_ISA": isa}
    code = (
        "import sys, pytest; from lmtool import kernels; "
        f"assert kernels.active_isa().name == {isa!r}, kernels.active_isa(); "
        f"sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', {test_file!r}, '-k', 'not instruction_set']))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def assert_captured_step_matches_layers(folder: Path, dtype: str, weights: str, ids: torch.Tensor, mask: torch.Tensor,
                                        backbone_class, monkeypatch) -> None:
    """A family's captured decode step (backbone_class.Plan, lmtool.captured) against its layers:
    a cached prefill of 6 tokens of the left-padded batch, then 4 one-token steps, each planned;
    then the same with no plan: the same logits to the bit. weights: "dense", or a scheme the
    folder's model is first quantized to (groups of 32)."""
    from lmtool.quantize.build import Recipe, quantize

    if weights != "dense":
        quantize(str(folder), folder.parent / weights, Recipe(weights, group_size=32), verify=False)
        folder = folder.parent / weights
    lm = lmtool.load(folder, dtype=dtype)

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            cache = lm.model.make_cache(ids.shape[0], 16)
            steps = [lm.model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
            steps += [lm.model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
        return torch.cat(steps, dim=1)

    runs = []
    plan_class = backbone_class.Plan
    run = plan_class.run
    monkeypatch.setattr(plan_class, "run", lambda self, *args: runs.append(1) or run(self, *args))
    planned = decode()
    assert len(runs) == 4  # every one-token step
    monkeypatch.setattr(backbone_class, "decode_plan", lambda self, cache, x: None)
    assert torch.equal(planned, decode())
