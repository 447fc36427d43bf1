"""The family registry: one `Family` per model_type, registered in lmtool/families/__init__.py.

A family packages what is particular to an architecture: its config schema, its backbone, the
names transformers gives its classes and modules, its tokenizer defaults, and its converters from
original checkpoint formats. Everything else (heads, loading, generation, the CLI) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ModelConfig
from .errors import UnsupportedError

TASKS = ("causal-lm", "sequence-classification", "token-classification", "question-answering")

# transformers' module name for each head; a family may override one (BLOOM: "classifier").
DEFAULT_HEAD_NAMES = {
    "causal-lm": "lm_head",
    "sequence-classification": "score",
    "token-classification": "score",
    "question-answering": "qa_outputs",
}
# Architecture name suffix in config.json's "architectures" for each task.
TASK_SUFFIX = {
    "causal-lm": "ForCausalLM",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
}


@dataclass
class Family:
    model_type: str  # config.json's "model_type"
    class_prefix: str  # "Gemma" -> GemmaForCausalLM, GemmaModel, ...
    config_class: type[ModelConfig]
    backbone_class: type  # nn.Module: (config) -> hidden states
    backbone_prefix: str = "model"  # state-dict prefix of the backbone
    head_names: dict[str, str] = field(default_factory=dict)  # overrides of DEFAULT_HEAD_NAMES
    # Tokenizer defaults when tokenizer_config.json is silent.
    add_bos_token: bool = True
    add_eos_token: bool = False
    padding_side: str = "left"
    # tokenizer_config.json written by `lmtool convert` (tokenizer class and special tokens).
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    # messages -> prompt text, for --chat; None when the family has no chat format.
    chat_format: Callable[[list[dict[str, str]]], str] | None = None
    # Rename a checkpoint key to ours (e.g. add a prefix the hub files lack); None = identity.
    rename_key: Callable[[str], str] | None = None
    soft_cap: Callable[[ModelConfig], float | None] | None = None
    # Original-format converters: format name -> object with detect/plan (see lmtool.convert).
    converters: dict[str, Any] = field(default_factory=dict)
    # Released sizes (name -> config dict) used when converting and for bench presets.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (config, tensor name) -> how many times one decode step reads that tensor; None = once each
    # (Zamba2 reads a shared block's weights once per invocation). For bench's bandwidth figures.
    decode_reads: Callable[[ModelConfig, str], int] | None = None

    def reads_per_step(self, config: ModelConfig, name: str) -> int:
        return self.decode_reads(config, name) if self.decode_reads else 1

    def head_name(self, task: str) -> str:
        return self.head_names.get(task, DEFAULT_HEAD_NAMES[task])

    def architecture(self, task: str) -> str:
        return self.class_prefix + TASK_SUFFIX[task]

    def task_for(self, architectures: list[str] | None) -> str:
        """The task that config.json's architectures name; causal-lm when they name none."""
        for arch in architectures or []:
            for task, suffix in TASK_SUFFIX.items():
                if arch.endswith(suffix):
                    return task
        return "causal-lm"

    def logits_soft_cap(self, config: ModelConfig) -> float | None:
        return self.soft_cap(config) if self.soft_cap else None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def families() -> dict[str, Family]:
    from . import families as _  # noqa: F401  (importing registers the built-in families)

    return dict(_FAMILIES)


def get_family(model_type: str | None, source: str = "config.json") -> Family:
    known = families()
    if model_type in known:
        return known[model_type]
    supported = ", ".join(sorted(known))
    if not model_type:
        raise UnsupportedError(f"{source}: no 'model_type'; lmtool supports: {supported}")
    raise UnsupportedError(f"{source}: model_type '{model_type}' is not supported; lmtool supports: {supported}")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UnsupportedError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    return task
