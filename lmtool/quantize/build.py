"""The quantizer: a float checkpoint in, a compressed-tensors folder out, tensor by tensor.

Each source tensor is read from the mapped file when its turn comes, quantized (in row blocks),
written, and its pages dropped, so memory stays near one tensor's working set whatever the model
size. The output is built in a temporary folder beside OUT and renamed into place when complete
(verification included), so an interrupted run leaves nothing.

What is quantized: the weights of the model's nn.Linear layers, and the input embedding (and with
it a tied LM head) at int8 unless --head bf16. Everything else keeps its dtype: norms, biases, every
1-D tensor, convolutions, RecurrentGemma's RG-LRU gates and Mamba2's A_log / D / dt_bias (none of
them are linear layers), Zamba2's LoRA adapters (rank-r products, a rounding of each would add up
over invocations) and task heads other than the LM head (a few rows).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import hub
from ..checkpoint import Checkpoint, PlannedTensor, atomic_folder, write_weights
from ..errors import LmtoolError
from . import DEFAULT_GATES, DEFAULT_GROUP_SIZE, GROUP_SIZES, HEAD_CHOICES, SCHEMES
from .format import is_quantized_config, planned_tensors, quantization_config
from .schemes import Quantized, quantize_int4_groups, quantize_int8_rows

# Files copied beside the weights.
COPIED_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json",
)
# The projections int4-m keeps at int8 on llama.cpp's use_more_bits layers (its Q4_K_M rule for
# attn_v, which covers BLOOM's fused query_key_value, and ffn_down).
MORE_BITS = re.compile(r"\.(v_proj|query_key_value|down_proj|dense_4h_to_h)$")
# Never quantized: Zamba2's per-invocation LoRA adapters.
ALWAYS_KEPT = re.compile(r"_adapter_list\.")
MAX_SHARD_SIZE = 5 * 10**9
# The block of config.json where lmtool keeps its own facts (other tools ignore unknown keys).
LMTOOL_BLOCK = "lmtool_quantization"
# The compressed-tensors release whose layout this follows (and the tests load with).
COMPRESSED_TENSORS_VERSION = "0.20.1"
DEFAULT_EVAL_TEXT = Path(__file__).with_name("eval_text.txt")


@dataclass
class Recipe:
    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE
    keep: str | None = None  # regex over the checkpoint's module names
    head: str = "int8"
    clip_search: bool = True

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise LmtoolError(f"unknown scheme '{self.scheme}'; choose {', '.join(SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            raise LmtoolError(f"group size {self.group_size} not supported; choose {', '.join(map(str, GROUP_SIZES))}")
        if self.head not in HEAD_CHOICES:
            raise LmtoolError(f"unknown head precision '{self.head}'; choose {', '.join(HEAD_CHOICES)}")
        if self.keep is not None:
            try:
                re.compile(self.keep)
            except re.error as exc:
                raise LmtoolError(f"--keep: not a valid regular expression ({exc})") from None

    @property
    def gates(self) -> tuple[float, float]:
        return DEFAULT_GATES[self.scheme]


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in its _M mixes (first and last eighth,
    and every third layer between)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@dataclass
class TensorChoice:
    key: str  # the checkpoint's weight key (module + ".weight")
    bits: int
    group_size: int | None

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")]


def choose(folder: Path, recipe: Recipe, checkpoint: Checkpoint) -> list[TensorChoice]:
    """Which checkpoint weights to quantize and how (the recipe applied to the model's layers)."""
    from ..loading import build_model, read_config

    family, config = read_config(folder)
    task = family.task_for(config.architectures)
    model = build_model(family, config, task, meta=True)
    stored = {}
    for key in checkpoint.keys():
        stored[family.rename_key(key) if family.rename_key else key] = key
    backbone = model.backbone
    embed_attr = next(n for n, m in backbone.named_children() if m is backbone.embed_tokens)
    head_weights = {f"{model.backbone_prefix}.{embed_attr}.weight"}
    if task == "causal-lm" and not model.tied:
        head_weights.add(f"{model.head_name}.weight")
    linears = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if task != "causal-lm":
        linears = [name for name in linears if not name.startswith(model.head_name + ".")]
    layers = getattr(config, "num_hidden_layers", None) or 1
    keep = re.compile(recipe.keep) if recipe.keep else None
    choices = []
    for ours in linears + sorted(head_weights):
        key = stored.get(ours)
        if key is None or checkpoint.info(key).dtype.is_floating_point is False:
            continue
        module = key[: -len(".weight")]
        if ALWAYS_KEPT.search(ours) or (keep and keep.search(module)):
            continue
        if ours in head_weights:
            if recipe.head == "bf16":
                continue
            bits, group = 8, None
        elif recipe.scheme == "int8":
            bits, group = 8, None
        elif recipe.scheme == "int4-m" and MORE_BITS.search(module) and use_more_bits(_layer_index(module) or 0, layers):
            bits, group = 8, None
        else:
            bits, group = 4, recipe.group_size
        in_features = checkpoint.info(key).shape[1]
        if group and in_features % group:
            raise LmtoolError(
                f"{folder}: group size {group} does not divide the {in_features} columns of '{key}' "
                f"(choose another --group-size, or --keep it)"
            )
        choices.append(TensorChoice(key, bits, group))
    return choices


def source_checksum(checkpoint: Checkpoint) -> str:
    """sha256 over the weight files' bytes, in file-name order."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.files):
        with open(checkpoint.files[name].path, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def quantize_tensor(weight: torch.Tensor, choice: TensorChoice, search: bool) -> Quantized:
    scale_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    if choice.bits == 8:
        return quantize_int8_rows(weight, scale_dtype)
    return quantize_int4_groups(weight, choice.group_size, scale_dtype, search=search)


def plan(checkpoint: Checkpoint, choices: list[TensorChoice], recipe: Recipe, errors: dict[str, dict]) -> list[PlannedTensor]:
    """The output tensors in the source's order; quantized ones record their SNR in `errors`."""
    by_key = {c.key: c for c in choices}
    planned: list[PlannedTensor] = []
    for info in checkpoint.infos():
        choice = by_key.get(info.name)
        if choice is None:
            planned.append(PlannedTensor(info.name, info.shape, info.dtype, lambda n=info.name: checkpoint.tensor(n)))
            continue

        def produce(choice=choice) -> Quantized:
            weight = checkpoint.tensor(choice.key)
            q = quantize_tensor(weight, choice, recipe.clip_search)
            errors[choice.module] = {"bits": choice.bits, "group_size": choice.group_size, "snr_db": round(q.snr_db, 2)}
            checkpoint.release(weight)
            return q

        scale_dtype = info.dtype
        planned += planned_tensors(choice.module, info.shape, choice.bits, choice.group_size, scale_dtype, produce)
    return planned


def bits_per_weight(choices: list[TensorChoice], checkpoint: Checkpoint) -> float:
    """Average stored bits per quantized weight, scales and zero points included."""
    bits = weights = 0
    for c in choices:
        out_features, in_features = checkpoint.info(c.key).shape
        scale_bits = torch.finfo(checkpoint.info(c.key).dtype).bits
        groups = 1 if c.group_size is None else in_features // c.group_size
        bits += out_features * (in_features * c.bits + groups * (scale_bits + (c.bits if c.group_size else 0)))
        weights += out_features * in_features
    return bits / weights if weights else 0.0


def quantize(
    ref: str,
    out: Path,
    recipe: Recipe,
    verify: bool = True,
    eval_text: Path | None = None,
    gates: tuple[float, float] | None = None,
    force: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize the model `ref` into `out`; returns the summary (with the verification report)."""
    from ..loading import family_of, read_config

    recipe.check()
    folder = hub.resolve(str(ref), check_config=family_of).path
    if folder.is_file():
        raise LmtoolError(f"{folder}: a model is a folder with config.json and weights, not a single file")
    read_config(folder)  # a config.json lmtool can run, or a one-line error
    # The source's own config.json, kept as it is apart from what quantizing adds.
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if is_quantized_config(config):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise LmtoolError(f"{folder}: already quantized ({method}); quantize from the float checkpoint")
    if Path(out).resolve() == folder.resolve():
        raise LmtoolError(f"{out}: the output must differ from the source")
    if Path(out).exists() and not force:
        raise LmtoolError(f"{out}: already exists (use --force to replace it)")
    eval_source = _eval_text(eval_text) if verify else None
    checkpoint = Checkpoint(folder)
    choices = choose(folder, recipe, checkpoint)
    if not choices:
        raise LmtoolError(f"{folder}: nothing to quantize (every linear layer is kept)")
    errors: dict[str, dict] = {}
    planned = plan(checkpoint, choices, recipe, errors)
    started = time.perf_counter()
    groups: dict[tuple[int, int | None], list[str]] = {}
    for c in choices:
        groups.setdefault((c.bits, c.group_size), []).append(c.module)
    summary: dict[str, Any] = {
        "source": str(ref),
        "output": str(out),
        "recipe": asdict(recipe),
        "source_checksum": source_checksum(checkpoint),
        "quantized_tensors": len(choices),
        "bits_per_weight": round(bits_per_weight(choices, checkpoint), 3),
    }
    if on_start:
        on_start(sum(t.nbytes for t in planned))
    with atomic_folder(Path(out), force=force) as tmp:
        if on_stage:
            on_stage("quantizing")
        with one_thread():
            write_weights(tmp, planned, MAX_SHARD_SIZE, on_tensor=on_tensor)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        summary["bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        summary["tensors"] = dict(sorted(errors.items()))
        for name in COPIED_FILES:
            if (folder / name).is_file():
                (tmp / name).write_bytes((folder / name).read_bytes())
        config["quantization_config"] = quantization_config(groups, COMPRESSED_TENSORS_VERSION)
        config[LMTOOL_BLOCK] = summary
        write_config(tmp, config)
        if verify:
            from .verify import compare

            if on_stage:
                on_stage("verifying")
            max_kld, min_top1 = gates or recipe.gates
            summary["verification"] = compare(folder, tmp, eval_source, max_kld, min_top1)
            write_config(tmp, config)
    return summary


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while quantizing: each pass over a cache-sized block is too short to
    share between threads (on a busy 2-core machine, 2 threads made quantizing 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _eval_text(path: Path | None) -> tuple[str, str]:
    """(name, text) of the verification text: --eval-text FILE, else the one shipped here."""
    from ..tasks.inputs import read_text_file

    path = Path(path) if path else DEFAULT_EVAL_TEXT
    text = read_text_file(str(path))  # one-line errors: missing, a folder, binary, not UTF-8
    if not text.strip():
        raise LmtoolError(f"{path}: empty text")
    return (path.name, text)
