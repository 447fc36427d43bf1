"""Megatron-DeepSpeed (bigscience) BLOOM checkpoints -> the standard layout.

A `global_stepN/` folder holds one `layer_XX-model_YY-model_states.pt` per pipeline layer and
tensor-parallel rank: the embedding (with its LayerNorm), the transformer blocks, the final
LayerNorm. Column-parallel weights are concatenated on dim 0 and row-parallel ones on dim 1;
replicated tensors (LayerNorms, row-parallel biases) are checked equal across ranks and averaged
when they are not, as bigscience's own conversion does. The fused QKV is already per head, so
concatenating its shards gives transformers' layout with no reordering.

Files are loaded with `weights_only=True` and memory-mapped, one pipeline layer at a time, so a
conversion holds about one layer in memory.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import PlannedTensor
from ...errors import CheckpointError, ConfigError

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
ARGS_FILE = "mp_rank_00_model_states.pt"

COLUMN_PARALLEL = {
    "word_embeddings.weight",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
}
ROW_PARALLEL = {"self_attention.dense.weight", "mlp.dense_4h_to_h.weight"}
REPLICATED = {
    "word_embeddings.norm.weight",
    "word_embeddings.norm.bias",
    "input_layernorm.weight",
    "input_layernorm.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "self_attention.dense.bias",
    "mlp.dense_4h_to_h.bias",
    "weight",  # final LayerNorm
    "bias",
}
EMBEDDING_KEYS = {"word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias"}
FINAL_NORM_KEYS = {"weight", "bias"}
BLOCK_KEYS = {
    f"{module}.{param}"
    for module in (
        "input_layernorm",
        "self_attention.query_key_value",
        "self_attention.dense",
        "post_attention_layernorm",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    for param in ("weight", "bias")
}

# Megatron training argument -> BloomConfig field.
ARG_NAMES = {
    "num_attention_heads": "n_head",
    "hidden_size": "hidden_size",
    "num_layers": "n_layer",
    "layernorm_epsilon": "layer_norm_epsilon",
    "apply_residual_connection_post_layernorm": "apply_residual_connection_post_layernorm",
    "tensor_model_parallel_size": "pretraining_tp",
}


def load_state(path: Path, allow: tuple[type, ...] = ()) -> Any:
    """torch.load with weights_only=True (plus the `allow`ed classes), memory-mapped when the
    file's format permits; one-line CheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # UnpicklingError for unsafe content, RuntimeError for bad archives
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be loaded safely ({reason})") from None


@dataclass
class PipelineLayer:
    """One pipeline layer: its file for each tensor-parallel rank, in rank order."""

    index: int
    files: list[Path]
    role: str = ""  # "embedding", "block" or "final_norm"


def find_layers(src: Path) -> tuple[list[PipelineLayer], int]:
    """The pipeline layers of a checkpoint folder, in order, and the tensor-parallel degree."""
    ranks: dict[int, dict[int, Path]] = {}
    for path in src.iterdir():
        match = LAYER_FILE.match(path.name)
        if match:
            ranks.setdefault(int(match[1]), {})[int(match[2])] = path
    if not ranks:
        raise CheckpointError(f"{src}: no layer_XX-model_YY-model_states.pt files")
    tp = max(len(files) for files in ranks.values())
    layers = []
    for index in sorted(ranks):
        if sorted(ranks[index]) != list(range(tp)):
            missing = sorted(set(range(tp)) - set(ranks[index]))
            raise CheckpointError(
                f"{src}: layer {index:02d} lacks tensor-parallel rank {missing[0]:02d} "
                f"(layer_{index:02d}-model_{missing[0]:02d}-model_states.pt)"
            )
        layers.append(PipelineLayer(index, [ranks[index][r] for r in range(tp)]))
    return layers, tp


def layer_role(keys: set[str], path: Path) -> str:
    """Which pipeline layer a file holds, from its exact tensor names."""
    expected = EMBEDDING_KEYS if "word_embeddings.weight" in keys else BLOCK_KEYS
    for role, names in (("embedding", EMBEDDING_KEYS), ("final_norm", FINAL_NORM_KEYS), ("block", BLOCK_KEYS)):
        if keys == names:
            return role
    odd = sorted(keys - expected) or sorted(expected - keys)
    problem = "unexpected" if keys - expected else "missing"
    raise CheckpointError(f"{path}: not a BLOOM pipeline layer ({problem} tensor '{odd[0]}')")


def merge_dim(key: str) -> int | None:
    """The dimension tensor-parallel shards of `key` are concatenated on; None = replicated."""
    if key in REPLICATED:
        return None
    return 1 if key in ROW_PARALLEL else 0


def merge(shards: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    if dim is not None:
        return torch.cat(shards, dim=dim)
    if all(torch.equal(shards[0], s) for s in shards[1:]):
        return shards[0]
    mean = torch.stack([s.float() for s in shards]).mean(0)
    return mean.to(shards[0].dtype)


class LayerReader:
    """Keeps the states of one pipeline layer (all its ranks) loaded at a time."""

    def __init__(self) -> None:
        self.layer: PipelineLayer | None = None
        self.states: list[dict[str, torch.Tensor]] = []

    def load(self, layer: PipelineLayer) -> list[dict[str, torch.Tensor]]:
        if self.layer is not layer:
            self.layer, self.states = None, []  # release the previous layer first
            self.states = [_state_dict(path) for path in layer.files]
            self.layer = layer
        return self.states


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = load_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def output_name(role: str, key: str, block: int) -> str:
    if role == "embedding":
        return "transformer." + key.replace("word_embeddings.norm.", "word_embeddings_layernorm.")
    if role == "final_norm":
        return f"transformer.ln_f.{key}"
    return f"transformer.h.{block}.{key}"


def merged_shape(states: list[dict[str, torch.Tensor]], key: str, path: Path) -> tuple[int, ...]:
    shapes = {tuple(s[key].shape) for s in states}
    if len(shapes) != 1:
        raise CheckpointError(f"{path}: '{key}' has different shapes across tensor-parallel ranks")
    shape = list(shapes.pop())
    dim = merge_dim(key)
    if dim is not None:
        shape[dim] *= len(states)
    return tuple(shape)


def plan_layer(layer: PipelineLayer, block: int, reader: LayerReader, notes: list[str]) -> list[PlannedTensor]:
    """Planned tensors of one pipeline layer. Its files are read once here (shapes, replicated
    tensors compared) and again, lazily, when the tensors are written."""
    states = [_state_dict(path) for path in layer.files]
    keys = set(states[0])
    for path, state in zip(layer.files[1:], states[1:]):
        if set(state) != keys:
            raise CheckpointError(f"{path}: its tensors differ from those of {layer.files[0].name}")
    layer.role = layer_role(keys, layer.files[0])
    tensors = []
    for key in states[0]:
        name = output_name(layer.role, key, block)
        if merge_dim(key) is None and not all(torch.equal(states[0][key], s[key]) for s in states[1:]):
            notes.append(f"{name}: differs across tensor-parallel ranks of layer {layer.index:02d}; averaged")
        tensors.append(
            PlannedTensor(
                name,
                merged_shape(states, key, layer.files[0]),
                states[0][key].dtype,
                lambda key=key: merge([s[key] for s in reader.load(layer)], merge_dim(key)),
            )
        )
    return tensors


def training_args(src: Path) -> tuple[dict[str, Any], str | None]:
    """BloomConfig fields from the Megatron arguments saved in mp_rank_00_model_states.pt, when
    that file exists and loads under weights_only (argparse.Namespace allowed); and why they could
    not be read, if so."""
    path = src / ARGS_FILE
    if not path.is_file():
        return {}, None
    try:
        state = load_state(path, allow=(argparse.Namespace,))
    except CheckpointError as exc:
        return {}, f"training arguments not read: {exc}"
    args = state.get("args") if isinstance(state, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, dict):
        return {}, f"training arguments not read: {path} holds no 'args'"
    return {field: args[name] for name, field in ARG_NAMES.items() if args.get(name) is not None}, None


def build_config(
    family, src: Path, shapes: dict[str, Any], given: list[tuple[str, dict]], tp: int, why: str | None = None
):
    """The output config: tensor-parallel degree as pretraining_tp, then each (origin, values) of
    `given` in order (training arguments, --config), then what the shapes say. A given value that
    contradicts the weights is an error; so is a head count that nothing gives."""
    aliases = {**family.config_class.aliases, "n_embed": "hidden_size"}
    data: dict[str, Any] = {"pretraining_tp": tp}
    for origin, values in given:
        values = {aliases.get(k, k): v for k, v in values.items()}
        for key, value in shapes.items():
            if key in values and values[key] != value:
                raise ConfigError(f"{origin}: '{key}' is {values[key]}, the weights in {src} say {value}")
        data.update(values)
    data.update(shapes)
    if "n_head" not in data:
        released = [f"{n} has {p['n_head']}" for n, p in family.presets.items()
                    if all(p.get(k, v) == v for k, v in shapes.items())]
        hint = f" ({'; '.join(released)})" if released else ""
        hint += f"; {why}" if why else ""
        raise ConfigError(
            f"{src}: the head count cannot be read from the weights; pass --config with a config.json "
            f"that sets n_head{hint}"
        )
    data.pop("model_type", None)
    origin = " + ".join(o for o, values in given if values) or str(src)
    config = family.config_class.from_dict(data, source=origin)
    config.architectures = [family.architecture("causal-lm")]
    return config


class MegatronDeepSpeedConverter:
    name = "bloom-megatron"
    description = "Megatron-DeepSpeed BLOOM checkpoint folder (layer_XX-model_YY-model_states.pt)"

    def detect(self, src: Path) -> bool:
        return src.is_dir() and any(LAYER_FILE.match(p.name) for p in src.iterdir())

    def plan(self, src: Path, options):
        from ...convert import ConversionPlan, tokenizer_files
        from ...registry import get_family

        family = get_family("bloom")
        layers, tp = find_layers(src)
        notes: list[str] = []
        reader = LayerReader()
        tensors: list[PlannedTensor] = []
        blocks = 0
        for layer in layers:
            tensors += plan_layer(layer, blocks, reader, notes)
            blocks += layer.role == "block"
        roles = [layer.role for layer in layers]
        if roles.count("embedding") != 1 or roles.count("final_norm") != 1 or not blocks:
            raise CheckpointError(f"{src}: expected one embedding layer, transformer layers and a final LayerNorm")
        vocab, hidden = next(t.shape for t in tensors if t.name == "transformer.word_embeddings.weight")
        shapes = {"vocab_size": vocab, "hidden_size": hidden, "n_layer": blocks}
        args, why = training_args(src)
        if why:
            notes.append(why)
        given = [(str(src / ARGS_FILE), args)]
        if options.config_file:
            given.append((str(options.config_file), options.config_overrides()))
        config = build_config(family, src, shapes, given, tp, why)
        files = tokenizer_files(options.tokenizer, family)
        return ConversionPlan(family, config, tensors, self.name, files, notes)


MEGATRON = MegatronDeepSpeedConverter()
