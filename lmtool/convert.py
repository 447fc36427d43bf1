"""`lmtool convert`: original checkpoints (and standard folders) to the standard layout.

Converters are registered per family (Family.converters, format name -> converter) in the style
of llama.cpp's convert_hf_to_gguf.py: each one recognises its format and returns a plan - the
output config and a list of tensors whose data is produced on demand. The driver here casts,
shards, writes through a temporary folder and renames it into place, so peak memory stays near one
tensor and an interrupted run leaves nothing half-written.

A converter is any object with:
    name: str                      format name for --from (e.g. "gemma-pytorch")
    description: str               one line for --help and errors
    detect(src: Path) -> bool      cheap check (file names, a header), never a full load
    plan(src: Path, options: ConvertOptions) -> ConversionPlan
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, PlannedTensor, atomic_folder, plan_shards, shard_names, write_weights
from .config import ModelConfig
from .errors import ConfigError, LmtoolError, ModelNotFoundError, UnsupportedError
from .registry import Family, families

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class ConvertOptions:
    config_file: Path | None = None  # --config: a config.json for what shapes cannot tell
    tokenizer: Path | None = None  # --tokenizer: a folder, tokenizer.json or tokenizer.model
    dtype: torch.dtype | None = None  # --dtype; None keeps each tensor's dtype

    def config_overrides(self) -> dict[str, Any]:
        if self.config_file is None:
            return {}
        try:
            data = json.loads(Path(self.config_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.config_file}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.config_file}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.config_file}: expected a JSON object")
        return data


@dataclass
class ConversionPlan:
    family: Family
    config: ModelConfig
    tensors: list[PlannedTensor]
    source_format: str
    # Output file name -> bytes, for tokenizer and other small files.
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # shown to the user (e.g. "vocab trimmed")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def side_files(folder: Path, with_tokenizer: bool = True) -> dict[str, bytes]:
    """The tokenizer files and generation_config.json that a folder holds, to copy as they are."""
    names = (*(TOKENIZER_FILES if with_tokenizer else ()), "generation_config.json")
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


class StandardFolder:
    """A folder already in the standard layout: re-cast and/or re-shard it."""

    name = "standard"
    description = "a folder with config.json and safetensors weights"

    def detect(self, src: Path) -> bool:
        return src.is_dir() and (src / "config.json").is_file() and (
            (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file()
        )

    def plan(self, src: Path, options: ConvertOptions) -> ConversionPlan:
        from .loading import read_config

        family, config = read_config(src)
        checkpoint = Checkpoint(src)
        tensors = [
            PlannedTensor(info.name, info.shape, info.dtype, lambda n=info.name: checkpoint.tensor(n))
            for info in checkpoint.infos()
        ]
        return ConversionPlan(family, config, tensors, self.name, side_files(src))


BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


class TransformersBinFolder:
    """A transformers folder saved as pickles (pytorch_model.bin, or shards with their index)
    instead of safetensors: read with weights_only and memory-mapped, written as safetensors."""

    name = "transformers-bin"
    description = f"a folder with config.json and {BIN_NAME} (or shards with {BIN_INDEX_NAME})"

    def detect(self, src: Path) -> bool:
        return src.is_dir() and (src / "config.json").is_file() and (
            (src / BIN_NAME).is_file() or (src / BIN_INDEX_NAME).is_file()
        )

    def _files(self, src: Path) -> list[Path]:
        if (src / BIN_NAME).is_file():
            return [src / BIN_NAME]
        index = src / BIN_INDEX_NAME
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except FileNotFoundError:
            raise LmtoolError(f"{src}: no {BIN_NAME} or {BIN_INDEX_NAME}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise LmtoolError(f"{index}: not a valid weight index") from None
        return [src / name for name in names]

    def plan(self, src: Path, options: ConvertOptions) -> ConversionPlan:
        from .loading import read_config
        from .original_formats import load_state_dict

        family, config = read_config(src)
        state: dict[str, torch.Tensor] = {}
        for path in self._files(src):
            state.update(load_state_dict(path))  # memory-mapped: nothing is read until written
        if config.tie_word_embeddings and family.task_for(config.architectures) == "causal-lm":
            # transformers pickles the tied copy too; the standard layout leaves it out.
            state.pop("lm_head.weight", None)
        tensors = [
            PlannedTensor(name, tuple(t.shape), t.dtype, lambda t=t: t) for name, t in state.items()
        ]
        return ConversionPlan(family, config, tensors, self.name, side_files(src))


def all_converters() -> dict[str, Any]:
    converters: dict[str, Any] = {}
    for family in families().values():
        converters.update(family.converters)
    converters[StandardFolder.name] = StandardFolder()
    converters[TransformersBinFolder.name] = TransformersBinFolder()
    return converters


def find_converter(src: Path, from_format: str | None) -> Any:
    converters = all_converters()
    if from_format:
        if from_format not in converters:
            raise UnsupportedError(
                f"unknown format '{from_format}'; choose one of: {', '.join(sorted(converters))}"
            )
        return converters[from_format]
    if not src.exists():
        raise ModelNotFoundError(f"{src}: no such file or folder")
    for converter in converters.values():
        if converter.detect(src):
            return converter
    raise UnsupportedError(
        f"{src}: not a checkpoint format lmtool recognises; name one with --from "
        f"({', '.join(sorted(converters))})"
    )


def cast_plan(plan: ConversionPlan, dtype: torch.dtype | None) -> None:
    """Cast floating tensors to dtype as they are produced (integers are left alone)."""
    if dtype is None:
        return
    for t in plan.tensors:
        if t.dtype.is_floating_point and t.dtype != dtype:
            produce = t.produce
            t.produce = lambda produce=produce, dtype=dtype: produce().to(dtype)
            t.dtype = dtype
    plan.config.dtype = str(dtype).removeprefix("torch.")


def finish_config(plan: ConversionPlan) -> dict[str, Any]:
    config = plan.config
    if not config.architectures:
        config.architectures = [plan.family.architecture("causal-lm")]
    if config.dtype is None and plan.tensors:
        floating = [t.dtype for t in plan.tensors if t.dtype.is_floating_point]
        if floating:
            config.dtype = str(floating[0]).removeprefix("torch.")
    return config.to_dict()


def describe(plan: ConversionPlan, max_shard_size: int | None) -> dict[str, Any]:
    shards = plan_shards(plan.tensors, max_shard_size)
    names = shard_names(len(shards))
    return {
        "format": plan.source_format,
        "family": plan.family.model_type,
        "architecture": (plan.config.architectures or [plan.family.architecture("causal-lm")])[0],
        "tensors": len(plan.tensors),
        "bytes": plan.total_bytes,
        "shards": [
            {"file": name, "tensors": len(shard), "bytes": sum(t.nbytes for t in shard)}
            for name, shard in zip(names, shards)
        ],
        "files": sorted(["config.json", *plan.files]),
        "notes": plan.notes,
    }


def convert(
    src: Path,
    out: Path | None,
    from_format: str | None = None,
    options: ConvertOptions | None = None,
    max_shard_size: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> dict[str, Any]:
    """Convert src to the standard layout at out; returns the plan's description."""
    options = options or ConvertOptions()
    src = Path(src)
    if not src.exists() and from_format in (None, StandardFolder.name):
        # A Hub id, as every other command takes: fetch the standard folder (or say why not).
        from .hub import resolve
        from .loading import family_of

        src = resolve(str(src), check_config=family_of).path
    converter = find_converter(src, from_format)
    plan = converter.plan(src, options)
    cast_plan(plan, options.dtype)
    config = finish_config(plan)
    summary = describe(plan, max_shard_size)
    if dry_run:
        return summary
    if out is None:
        raise LmtoolError("no output folder given")
    out = Path(out)
    if out.resolve() == src.resolve():
        raise LmtoolError(f"{out}: the output must differ from the source")
    if on_start:
        on_start(plan.total_bytes)
    with atomic_folder(out, force=force) as tmp:
        write_weights(tmp, plan.tensors, max_shard_size, on_tensor=on_tensor)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in plan.files.items():
            (tmp / name).write_bytes(data)
    summary["output"] = str(out)
    return summary


# --- tokenizer files ---------------------------------------------------------------------------


def _tokenizer_sources(path: Path) -> tuple[Path | None, Path | None, dict[str, Any]]:
    """(tokenizer.json, tokenizer.model, the folder's tokenizer_config.json) from --tokenizer PATH."""
    if path.is_dir():
        json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
        json_path = json_file if json_file.is_file() else None
        model_path = model_file if model_file.is_file() else None
        if json_path is None and model_path is None:
            raise LmtoolError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
        settings: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            # The same JSON-object reader as --config, with its one-line errors.
            settings = ConvertOptions(config_file=path / "tokenizer_config.json").config_overrides()
        return json_path, model_path, settings
    if not path.is_file():
        raise LmtoolError(f"{path}: no such tokenizer file or folder")
    if path.suffix == ".json":
        return path, None, {}
    if path.suffix == ".model":
        return None, path, {}
    raise LmtoolError(f"{path}: expected a folder, a tokenizer.json or a SentencePiece .model file")


def _bos_eos_template(backend: Any, settings: dict[str, Any]) -> Any:
    """The post-processor that adds BOS (and EOS) as tokenizer_config.json says, for tools that
    read tokenizer.json alone; None when neither is added."""
    from tokenizers import processors

    front = [settings["bos_token"]] if settings.get("add_bos_token") and settings.get("bos_token") else []
    back = [settings["eos_token"]] if settings.get("add_eos_token") and settings.get("eos_token") else []
    if not front and not back:
        return None
    single = " ".join([*front, "$A", *back])
    pair = " ".join([single, *front, "$B:1", *back])
    specials = [(token, backend.token_to_id(token)) for token in dict.fromkeys(front + back)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _known_tokens_only(settings: dict[str, Any], backend: Any) -> dict[str, Any]:
    """Special tokens the vocabulary lacks set to null (dropped from lists), so that transformers
    does not append them as new ids past the model's embedding."""
    def known(token: Any) -> bool:
        return isinstance(token, str) and backend.token_to_id(token) is not None

    checked = dict(settings)
    for key, value in settings.items():
        if key.endswith("_token") and isinstance(value, str) and not known(value):
            checked[key] = None
        elif key == "additional_special_tokens" and isinstance(value, list):
            checked[key] = [token for token in value if known(token)]
    return checked


def find_tokenizer(options: ConvertOptions, near: list[Path], notes: list[str], family: Family) -> dict[str, bytes]:
    """An original checkpoint's tokenizer files: from --tokenizer, else the first file of `near`
    that exists (a tokenizer.model beside the checkpoint), else none (with a note)."""
    path = options.tokenizer or next((p for p in near if p.is_file()), None)
    if path is None:
        notes.append("no tokenizer given (--tokenizer) or found beside the checkpoint: the output has none")
        return {}
    if options.tokenizer is None:
        notes.append(f"tokenizer from {path}")
    return tokenizer_files(path, family)


def tokenizer_files(path: Path | None, family: Family) -> dict[str, bytes]:
    """The tokenizer files of an output folder from --tokenizer PATH (a folder, a tokenizer.json
    or a tokenizer.model). A SentencePiece model is also converted to tokenizer.json, so loaders
    that only read tokenizer.json (and transformers' fast tokenizers) work.

    tokenizer_config.json is the family's defaults, then the special tokens the SentencePiece
    model was trained with, then the given folder's own tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer

    from .spm import read_model, sentencepiece_to_tokenizer

    if path is None:
        return {}
    json_path, model_path, folder_settings = _tokenizer_sources(Path(path))
    settings = dict(family.tokenizer_config)
    if model_path is not None:
        settings.update(read_model(model_path).special_tokens())
    settings.update(folder_settings)
    files: dict[str, bytes] = {}
    if json_path is not None:
        try:
            backend = HFTokenizer.from_file(str(json_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise LmtoolError(f"{json_path}: cannot load tokenizer ({exc})") from None
        files["tokenizer.json"] = json_path.read_bytes()
        settings = _known_tokens_only(settings, backend)
    else:
        backend = sentencepiece_to_tokenizer(model_path, special_tokens=settings.get("additional_special_tokens") or [])
        settings = _known_tokens_only(settings, backend)
        template = _bos_eos_template(backend, settings)
        if template is not None:
            backend.post_processor = template
        files["tokenizer.json"] = backend.to_str(pretty=True).encode("utf-8")
    if model_path is not None:
        files["tokenizer.model"] = model_path.read_bytes()
    files["tokenizer_config.json"] = (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files
