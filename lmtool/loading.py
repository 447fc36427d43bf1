"""`lmtool.load`: from a model reference to a ready module, tokenizer and config.

The module is built with its parameters on the meta device (no memory, no random init), then each
parameter is assigned the checkpoint's memory-mapped tensor: when the dtype and device already
match, the parameter *is* the mapping and nothing is copied. A cast or a move copies one tensor
at a time and drops the source pages right after.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import hub
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, LmtoolError, UnsupportedError
from .heads import TaskModel
from .inference import WeightSource, backend_for, load_frozen
from .quantize.format import quantized_modules
from .quantize.linear import QuantizedEmbedding, swap_quantized
from .registry import TASK_SUFFIX, Family, check_task, families, get_family
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A quantized load copies most of the file (int4 rows, and int8 ones on AVX2, are interleaved for
# the kernel) and releases the mapped pages under what it copied. A small tensor left mapped among
# them (a norm's weight) maps its whole 2 MB folio back when decode reads it, released neighbours
# included: Gemma-2B int4 had 70 MiB of released nibbles and scales back after a few steps.
# Tensors below this are copied too, read once at load.
SMALL_TENSOR_BYTES = 2 * 2**20


@dataclass
class LoadedModel:
    model: TaskModel
    tokenizer: Tokenizer | None
    config: ModelConfig
    family: Family
    task: str
    path: Path
    generation_config: dict

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weight_bytes(self) -> int:
        """Bytes of the checkpoint's weight files (the frozen backends keep some weights outside
        the module's parameters, so those cannot tell)."""
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))


def read_config(folder: Path) -> tuple[Family, ModelConfig]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (is this a model folder in the standard layout?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    family = family_of(data, str(path))
    return family, family.config_class.from_dict(data, source=str(path))


def family_of(config: dict, source: str) -> Family:
    """The family config.json names: its model_type, else the class its architectures name."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = config.get("model_type")
    if not model_type:
        for family in families().values():
            if any(str(a).startswith(family.class_prefix + "For") for a in config.get("architectures") or []):
                model_type = family.model_type
    return get_family(model_type, source)


TASK_COMMANDS = {
    "causal-lm": "generate",
    "sequence-classification": "classify",
    "token-classification": "tag",
    "question-answering": "qa",
}


def checkpoint_task(family: Family, architectures: list[str] | None, names: set[str]) -> str:
    """The head a checkpoint holds (names are the family's own tensor names): the task that
    config.json's architectures name; without one, the head tensors present (in the families
    where both classification heads are called `score`, the token classifier's has a bias and
    the sequence classifier's has none); else causal-lm (a tied LM head leaves no tensor)."""
    if any(str(a).endswith(suffix) for a in architectures or [] for suffix in TASK_SUFFIX.values()):
        return family.task_for(architectures)

    def has(task: str) -> bool:
        return any(name.startswith(family.head_name(task) + ".") for name in names)

    token_head = family.head_name("token-classification")
    if has("question-answering"):
        return "question-answering"
    if has("token-classification") and (
        token_head != family.head_name("sequence-classification") or f"{token_head}.bias" in names
    ):
        return "token-classification"
    if has("sequence-classification"):
        return "sequence-classification"
    return "causal-lm"


def own_names(family: Family, keys: list[str]) -> set[str]:
    """The family's names for a checkpoint's tensor names."""
    return {family.rename_key(key) if family.rename_key else key for key in keys}


def resolve_dtype(name: str | torch.dtype | None, config: ModelConfig, checkpoint: Checkpoint | None) -> torch.dtype:
    """auto (None) = the checkpoint's dtype: config.json's, else its first floating tensor's."""
    if isinstance(name, torch.dtype):
        return name
    if name not in (None, "auto"):
        if name not in DTYPES:
            raise LmtoolError(f"unknown dtype '{name}'; choose auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if config.dtype in DTYPES:
        return DTYPES[config.dtype]
    if checkpoint is not None:
        for info in checkpoint.infos():
            if info.dtype.is_floating_point:
                return info.dtype
    return torch.float32


# Below this many bytes of weights a forward pass is too short to share between threads: the
# hand-offs cost more than they save, and on a busy host a thread that waits for a core stalls
# every step (the demo decoded at 10 tok/s on two threads of a loaded 2-core machine, 350-470 on one).
SMALL_MODEL_BYTES = 32 * 2**20


def set_threads(threads: int | None, weight_bytes: int) -> int:
    """Set torch's intra-op threads for this process and return the number: `threads` when
    given, else one for a model of under SMALL_MODEL_BYTES and torch's default (one per core)
    otherwise."""
    if threads is None:
        if weight_bytes >= SMALL_MODEL_BYTES:
            return torch.get_num_threads()
        threads = 1
    if threads < 1:
        raise LmtoolError(f"--threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str | torch.device | None) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmtoolError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmtoolError(f"device '{name}' requested but CUDA is not available")
    return device


# torch.nn.init's in-place initialisers, skipped while building on meta: the values are never
# used, and on meta tensors they run Python reference kernels whose first call imports
# torch._dynamo (about a second of a cold load).
INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


def _skip_init(tensor, *args, **kwargs):
    return tensor


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real: rotary tables and the like)."""
    original = nn.Module.register_parameter
    initialisers = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS if hasattr(nn.init, name)}

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register
    for name in initialisers:
        setattr(nn.init, name, _skip_init)
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for name, function in initialisers.items():
            setattr(nn.init, name, function)


def build_model(family: Family, config: ModelConfig, task: str, meta: bool = False) -> TaskModel:
    if meta:
        with parameters_on_meta():
            return TaskModel(family, config, task, family.backbone_class(config))
    return TaskModel(family, config, task, family.backbone_class(config))


def load_weights(
    model: TaskModel,
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    frozen: bool = True,
) -> None:
    """Assign every parameter from the checkpoint; errors name the folder and the tensor.

    With frozen (CPU, float32 or bfloat16), linear layers go to the fastest backend as they load
    (lmtool.inference). A tensor that is copied (cast, packed, moved) has its mapped pages
    dropped right after, so the copy replaces the original in memory instead of adding to it.
    """
    family = model.family
    # Quantized checkpoints: their modules are swapped for quantized ones first (lmtool.quantize).
    quantized = swap_quantized(model, checkpoint, dtype, device, source, fuse=frozen) if quantized_modules(checkpoint) else set()
    available: dict[str, str] = {}
    for key in checkpoint.keys():
        if key in quantized:
            continue
        ours = family.rename_key(key) if family.rename_key else key
        available[ours] = key
    expected = model.state_dict(keep_vars=True)
    head_prefixes = tuple(f"{family.head_name(task)}." for task in TASK_SUFFIX)
    unused = [name for name in available if name not in expected and name.startswith(head_prefixes)]
    if unused:
        # A head tensor this head does not read means another head (a token classifier's biased
        # `score` read as a sequence classifier) and wrong results, not a harmless leftover.
        raise CheckpointError(
            f"{source}: tensor '{available[unused[0]]}' is not part of the {model.task} head; "
            "the checkpoint holds another head (see 'lmtool inspect')"
        )
    tied_key = f"{model.head_name}.weight" if model.tied else None
    tensors: dict[str, torch.Tensor] = {}  # our name -> the checkpoint's tensor, still mapped
    missing = []
    for name, param in expected.items():
        if name == tied_key:
            continue
        if name not in available:
            if isinstance(param, nn.Parameter):
                missing.append(name)
            continue
        info = checkpoint.info(available[name])
        if tuple(info.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: tensor '{available[name]}' has shape {list(info.shape)}, "
                f"the config implies {list(param.shape)}"
            )
        tensors[name] = checkpoint.tensor(available[name])
    if missing:
        head = model.head_name
        if all(m.startswith(head + ".") for m in missing):
            raise CheckpointError(
                f"{source}: has no weights for the {model.task} head ('{missing[0]}'); "
                f"pick the task its config.json names, or a checkpoint trained for {model.task}"
            )
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}'{more}")
    backend = backend_for(dtype, device) if frozen else None
    if backend:
        weights = WeightSource(tensors, dtype, backend, checkpoint.release)
        load_frozen(model, weights)
        tensors = {n: t for n, t in tensors.items() if n not in weights.consumed}
    state: dict[str, torch.Tensor] = {}
    small_copies = 0
    for name, tensor in tensors.items():
        copy = tensor.to(dtype) if tensor.dtype != dtype and tensor.is_floating_point() else tensor
        if copy is tensor and quantized and tensor.numel() * tensor.element_size() < SMALL_TENSOR_BYTES:
            copy = tensor.clone()
            small_copies += 1
            if small_copies % 16 == 0:
                # each small tensor's read mapped back its 2 MB folio of released neighbours: 74 MB
                # over Gemma-2B's norms, on top of the interleaved copies (int4's peak 1.10x its bytes)
                checkpoint.release_again()
        state[name] = copy.to(device)
        if state[name] is not tensor:
            checkpoint.release(tensor)
    model.load_state_dict(state, strict=False, assign=True)
    if not backend and not isinstance(model.backbone.embed_tokens, QuantizedEmbedding):
        model.tie_weights()
    model.to(device)  # the buffers (rotary tables); parameters are already there
    checkpoint.release_again()


def load(
    ref: str | Path,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: bool = True,
    frozen: bool = True,
) -> LoadedModel:
    """Load a model for inference.

    ref: a local folder in the standard layout, or a Hub id with an optional @revision.
    task: causal-lm, sequence-classification, token-classification or question-answering;
          None picks the head that config.json's architectures name, else causal-lm.
    dtype: auto/None (the checkpoint's), float32, bfloat16 or float16.
    device: auto/None (cuda when available), cpu, cuda or cuda:N.
    frozen: on CPU, put the linear layers on the fastest backend (lmtool.inference); the model
          is then for inference only. False keeps plain nn.Linear parameters.
    """
    resolved = hub.resolve(str(ref), check_config=family_of)
    folder = resolved.path
    if folder.is_file():
        raise LmtoolError(f"{folder}: a model is a folder with config.json and weights, not a single file")
    family, config = read_config(folder)
    checkpoint = Checkpoint(folder)
    held = checkpoint_task(family, config.architectures, own_names(family, checkpoint.keys()))
    task = check_task(task) if task else held
    if task != held:
        raise UnsupportedError(f"{folder}: holds a {held} head, not {task} (use 'lmtool {TASK_COMMANDS[held]}')")
    torch_dtype = resolve_dtype(dtype, config, checkpoint)
    torch_device = resolve_device(device)
    model = build_model(family, config, task, meta=True)
    load_weights(model, checkpoint, torch_dtype, torch_device, str(folder), frozen=frozen)
    model.eval()
    model.requires_grad_(False)
    tok = None
    if tokenizer and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        tok = Tokenizer.from_folder(folder, family=family, config=config)
    gen_path = folder / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return LoadedModel(model, tok, config, family, task, folder, generation_config)
