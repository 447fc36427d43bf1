"""Typed model configs read from and written back to config.json.

Each family declares a dataclass that subclasses `ModelConfig`. Reading validates types and values
with errors that name the file and the key; keys the dataclass does not know are kept in `extra`
and written back unchanged, so a config survives a round trip through lmtool.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value coerced to tp). ints are accepted for floats; bools are never ints."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, coerced = _check(value, arm)
            if ok:
                return True, coerced
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = []
        for item in value:
            ok, coerced = _check(item, item_tp)
            if not ok:
                return False, value
            items.append(coerced)
        return True, items
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def rope_setting(parameters: dict | None, key: str, legacy: float | None, default: float) -> float:
    """A rotary setting: rope_parameters[key] (transformers 5), else the legacy top-level key,
    else the default."""
    if parameters and key in parameters:
        return float(parameters[key])
    return legacy if legacy is not None else default


def check_rope_type(parameters: dict | None, source: str, family: str) -> None:
    rope_type = (parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{source}: rope_type '{rope_type}' is not supported for {family}")


@dataclasses.dataclass
class ModelConfig:
    """Fields every family shares. Subclasses add their own with transformers' names and defaults."""

    model_type: ClassVar[str] = ""
    # Legacy or alternative key -> field name (BLOOM's n_embed -> hidden_size, ...).
    aliases: ClassVar[dict[str, str]] = {}

    architectures: list[str] | None = None
    dtype: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    id2label: dict | None = None
    label2id: dict | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- reading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        aliases = {"torch_dtype": "dtype", **cls.aliases}
        for alias, name in aliases.items():
            if alias in data:
                value = data.pop(alias)
                data.setdefault(name, value)
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra" or f.name not in data:
                continue
            value = data.pop(f.name)
            ok, value = _check(value, hints[f.name])
            if not ok:
                raise ConfigError(
                    f"{source}: '{f.name}' should be {_type_name(hints[f.name])}, got {value!r}"
                )
            kwargs[f.name] = value
        data.pop("model_type", None)
        config = cls(**kwargs, extra=data)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def validate(self, source: str) -> None:
        """Raise ConfigError for values that cannot describe a model. Subclasses extend this."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            value = getattr(self, name, 1)
            if value is not None and value <= 0:
                raise ConfigError(f"{source}: '{name}' must be positive, got {value}")
        if self.id2label is not None:
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: 'id2label' keys must be integers") from None
            if sorted(self.id2label) != list(range(len(self.id2label))):
                raise ConfigError(f"{source}: 'id2label' must number labels 0..N-1")

    # --- derived values ------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        # transformers' default is two labels when a classifier config gives none.
        return len(self.id2label) if self.id2label else 2

    @property
    def labels(self) -> list[str]:
        if self.id2label:
            return [self.id2label[i] for i in range(len(self.id2label))]
        return [f"LABEL_{i}" for i in range(self.num_labels)]

    @property
    def dtype_bytes(self) -> int:
        """Bytes per value of the checkpoint's dtype (float32 when config.json names none)."""
        return 2 if self.dtype in ("bfloat16", "float16") else 4

    def structure(self) -> dict[str, Any]:
        """What `lmtool inspect` shows about the architecture beyond the config (a family's block
        pattern, its decoding state...); nothing for plain decoder stacks."""
        return {}

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # --- writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("id2label",) and value is not None:
                value = {str(k): v for k, v in value.items()}
            if value is None:
                continue  # unset: readers fall back to their defaults
            out[f.name] = value
        out.update(self.extra)
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

