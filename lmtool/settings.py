"""Where every setting of a command comes from, in one place: the command line, then a recipe, then
the checkpoint's generation_config.json, then the built-in default. Torch-free: `--print-config`
uses it without loading weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Built-in sampling defaults, used where the command line, the recipe and the checkpoint's
# generation_config.json are all silent.
GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}
# Tokens per window of classify, tag and qa (capped by the model's max_position_embeddings).
DEFAULT_MAX_LENGTH = 512

COMMAND_LINE = "command line"
CHECKPOINT = "generation_config.json"
DEFAULT = "default"


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # COMMAND_LINE, "recipe NAME", CHECKPOINT or DEFAULT


def resolve(
    command_line: dict[str, Any],
    defaults: dict[str, Any],
    recipe: dict[str, Any] | None = None,
    recipe_source: str = "recipe",
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Setting]:
    """Each setting named in `defaults`, from the first of these that has it: the command line,
    the recipe, the checkpoint's generation settings, the built-in default."""
    layers = [(command_line, COMMAND_LINE), (recipe or {}, recipe_source), (checkpoint or {}, CHECKPOINT)]
    merged = {}
    for name, default in defaults.items():
        merged[name] = next(
            (Setting(values[name], source) for values, source in layers if values.get(name) is not None),
            Setting(default, DEFAULT),
        )
    return merged


def checkpoint_generation_settings(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings a checkpoint's generation_config.json sets; do_sample false means greedy."""
    found = {name: generation_config[name] for name in GENERATION_DEFAULTS if generation_config.get(name) is not None}
    if "min_p" in generation_config and generation_config["min_p"] is None:
        found["min_p"] = 0.0  # written out as null: off
    if generation_config.get("do_sample") is False:
        found["temperature"] = 0.0
    return found
