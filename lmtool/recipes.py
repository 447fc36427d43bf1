"""Recipes: named YAML files of settings that any command takes with `--recipe NAME|FILE`.

A checkpoint recipe names a released model (`model`, its `family`, `options` such as dtype and
generation defaults, and where the `original` checkpoint comes from and how it converts); a job
recipe names the `command` it is for and that command's `options`. Option names are the long
options without dashes (`max-new-tokens` or `max_new_tokens`). Which option wins is decided in
lmtool.settings (command line > recipe > generation_config.json > default); this module reads and
checks the files. Torch-free: `--print-config`, `lmtool recipes` and completion use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import CONVERT_FORMATS, FAMILIES
from .errors import LmtoolError

# The recipes shipped with lmtool (recipes/ at the top of the source tree), then the user's own.
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"
USER_DIR_VARIABLE = "LMTOOL_RECIPES"  # a folder of the user's own recipes; they shadow shipped ones

# Top-level keys and the type each must have.
KEYS: dict[str, type | tuple[type, ...]] = {
    "description": str,
    "model": str,
    "family": str,
    "command": str,
    "options": dict,
    "original": dict,
}
ORIGINAL_KEYS = {"format": str, "source": str, "convert": str}
OPTION_VALUE_TYPES = (str, int, float, bool, list)


class RecipeError(LmtoolError):
    """A recipe that cannot be used: one line naming the file and the key."""


@dataclass
class Recipe:
    name: str
    path: Path
    description: str
    model: str | None = None
    family: str | None = None
    command: str | None = None  # a job recipe's command; None for a checkpoint recipe
    options: dict[str, Any] = field(default_factory=dict)  # option name (underscores) -> value
    original: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "job" if self.command else "checkpoint"

    @property
    def source(self) -> str:
        """How --print-config names this layer."""
        return f"recipe {self.name}"

    def error(self, key: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.path}: {key}: {problem}")


def folders() -> list[Path]:
    """Where recipe names are looked up, first match wins."""
    user = os.environ.get(USER_DIR_VARIABLE)
    return ([Path(user).expanduser()] if user else []) + [SHIPPED]


def names() -> list[str]:
    """Every recipe name, sorted (reads no file contents: completion calls this on every TAB)."""
    found = set()
    for folder in folders():
        if folder.is_dir():
            found.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(found)


def find(ref: str) -> Path:
    """A recipe name, or a path to a .yaml file."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in ref:
        if not path.is_file():
            raise RecipeError(f"{ref}: no such recipe file")
        return path
    for folder in folders():
        candidate = folder / f"{ref}.yaml"
        if candidate.is_file():
            return candidate
    known = ", ".join(names()) or "none"
    raise RecipeError(f"{ref}: no such recipe (known: {known}; or give a .yaml file)")


def load(ref: str) -> Recipe:
    """Read and check a recipe's structure; option values are checked against the command that
    uses them (lmtool.cli)."""
    import yaml

    path = find(ref)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (description, model, options, ...)")
    for key, value in data.items():
        if key not in KEYS:
            raise RecipeError(f"{path}: {key}: unknown key (known: {', '.join(KEYS)})")
        if not isinstance(value, KEYS[key]):
            raise RecipeError(f"{path}: {key}: expected {_type_name(KEYS[key])}, got {_type_name(type(value))}")
    if "description" not in data:
        raise RecipeError(f"{path}: description: missing (one line saying what the recipe is for)")
    if ("model" in data) == ("command" in data):
        raise RecipeError(f"{path}: model: give either model (a checkpoint recipe) or command (a job recipe)")
    if data.get("family") is not None and data["family"] not in FAMILIES:
        raise RecipeError(f"{path}: family: '{data['family']}' is not one of {', '.join(FAMILIES)}")
    options = {}
    for key, value in (data.get("options") or {}).items():
        if not isinstance(key, str):
            raise RecipeError(f"{path}: options: option names are strings, got {key!r}")
        if not isinstance(value, OPTION_VALUE_TYPES):
            raise RecipeError(f"{path}: options.{key}: expected a string, number, boolean or list")
        options[key.replace("-", "_")] = value
    original = data.get("original") or {}
    for key, value in original.items():
        if key not in ORIGINAL_KEYS:
            raise RecipeError(f"{path}: original.{key}: unknown key (known: {', '.join(ORIGINAL_KEYS)})")
        if not isinstance(value, str):
            raise RecipeError(f"{path}: original.{key}: expected a string")
    if original.get("format") is not None and original["format"] not in CONVERT_FORMATS:
        raise RecipeError(f"{path}: original.format: '{original['format']}' is not one of {', '.join(CONVERT_FORMATS)}")
    name = path.stem
    return Recipe(name, path, data["description"], data.get("model"), data.get("family"), data.get("command"),
                  options, original)


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {str: "a string", dict: "a mapping", list: "a list", int: "an integer", float: "a number", bool: "a boolean"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)
