"""`lmtool inspect`: what a checkpoint is, from its config and tensor headers alone.

Works on a standard folder, a single .safetensors file, a Hub id (config.json and the safetensors
headers only: no weights are downloaded) and any original format a converter recognises (its
conversion plan says what the tensors will be).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from . import hub
from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .errors import LmtoolError, UnsupportedError
from .registry import Family

BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def summarize_tensors(infos: list[TensorInfo], with_tensors: bool) -> dict[str, Any]:
    """Parameter and byte counts, overall, per dtype and per block (a numbered layer)."""
    per_block: dict[str, int] = defaultdict(int)
    for info in infos:
        match = BLOCK.match(info.name)
        per_block[match.group(1) if match else info.name.rsplit(".", 1)[0]] += info.numel
    dtypes = Counter()
    for info in infos:
        dtypes[_dtype_name(info.dtype)] += info.nbytes
    summary: dict[str, Any] = {
        "parameters": sum(i.numel for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "dtypes": dict(dtypes),
        "tensor_count": len(infos),
        "blocks": dict(per_block),
    }
    if with_tensors:
        summary["tensors"] = [
            {"name": i.name, "shape": list(i.shape), "dtype": _dtype_name(i.dtype)} for i in infos
        ]
    return summary


def describe_model(family: Family, config, infos: list[TensorInfo]) -> dict[str, Any]:
    from .loading import checkpoint_task, own_names

    names = own_names(family, [i.name for i in infos])
    # One head, the one loading picks: the architectures' task, else what the head tensors say.
    task = checkpoint_task(family, config.architectures, names)
    # save_pretrained leaves out a tied lm_head: the checkpoint still is a causal LM.
    tied = task == "causal-lm" and bool(config.tie_word_embeddings)
    has_head = tied or any(n.startswith(family.head_name(task) + ".") for n in names)
    described = {
        "family": family.model_type,
        "architecture": (config.architectures or [family.architecture(task)])[0],
        "task": task,
        "heads": [task] if has_head else [],
        "tied_embeddings": tied,
        "structure": config.structure(),
        "config": config.to_dict(),
    }
    if config.extra.get("quantization_config"):
        from .quantize.format import describe

        described["quantization"] = describe(config.extra, infos)
    return described


def inspect_folder(folder: Path, with_tensors: bool) -> dict[str, Any]:
    from .loading import read_config
    from .tokenizer import Tokenizer

    family, config = read_config(folder)
    checkpoint = Checkpoint(folder)
    infos = checkpoint.infos()
    result = {"source": str(folder), "format": "standard", **describe_model(family, config, infos)}
    result.update(summarize_tensors(infos, with_tensors))
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
        result["tokenizer"] = Tokenizer.from_folder(folder, family=family, config=config).summary()
    else:
        result["tokenizer"] = None
    return result


def inspect_file(path: Path, with_tensors: bool) -> dict[str, Any]:
    st = SafetensorsFile(path)
    infos = [st.infos[k] for k in st.keys()]
    result = {"source": str(path), "format": "safetensors", "metadata": st.metadata}
    result.update(summarize_tensors(infos, with_tensors))
    return result


def inspect_hub(ref: hub.ModelRef, with_tensors: bool) -> dict[str, Any]:
    from huggingface_hub import get_safetensors_metadata

    from .loading import family_of

    cached = hub.cached_folder(ref)
    if cached is not None:
        # Everything is in the local cache: read it there, offline or not.
        return {**inspect_folder(cached, with_tensors), "source": ref.text, "format": "hub"}
    config_path = hub.hub_file(ref, "config.json")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LmtoolError(f"{ref.repo_id}: config.json is not valid JSON") from None
    family = family_of(data, f"{ref.repo_id}/config.json")
    config = family.config_class.from_dict(data, source=f"{ref.repo_id}/config.json")
    hub.prepare_hub()
    try:
        meta = get_safetensors_metadata(ref.repo_id, revision=ref.revision)
    except Exception as exc:
        raise hub._hub_error(ref, exc) from None
    from .checkpoint import DTYPES

    infos = [
        TensorInfo(name, DTYPES[t.dtype], tuple(t.shape))
        for file_meta in meta.files_metadata.values()
        for name, t in file_meta.tensors.items()
    ]
    result = {"source": ref.text, "format": "hub", **describe_model(family, config, infos)}
    result.update(summarize_tensors(infos, with_tensors))
    return result


def inspect_original(path: Path, with_tensors: bool) -> dict[str, Any]:
    from .convert import ConvertOptions, describe, find_converter

    try:
        converter = find_converter(path, None)
    except UnsupportedError:
        # find_converter's advice (--from) is convert's; inspect detects formats only.
        what = ("has config.json but no weights" if (path / "config.json").is_file()
                else "is not a checkpoint lmtool recognises")
        raise UnsupportedError(
            f"{path}: {what} (a standard folder with safetensors, a .safetensors file, or a format "
            "'lmtool convert --help' lists)"
        ) from None
    plan = converter.plan(path, ConvertOptions())
    infos = [TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in plan.tensors]
    result = {"source": str(path), "format": plan.source_format, **describe_model(plan.family, plan.config, infos)}
    result.update(summarize_tensors(infos, with_tensors))
    result["notes"] = describe(plan, None)["notes"]
    return result


def inspect(ref_text: str, with_tensors: bool = False) -> dict[str, Any]:
    ref = hub.parse(ref_text)
    if ref.is_hub:
        return inspect_hub(ref, with_tensors)
    from .convert import StandardFolder

    path = ref.path
    if StandardFolder().detect(path):
        return inspect_folder(path, with_tensors)
    if path.is_file() and path.suffix == ".safetensors":
        return inspect_file(path, with_tensors)
    return inspect_original(path, with_tensors)
