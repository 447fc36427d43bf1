"""Reading the authors' original checkpoint files, shared by the families' converters.

- PyTorch: a `torch.save` state dict, memory-mapped and loaded with weights_only (no arbitrary
  objects are ever unpickled); `pickle_text` gives the pickle's text (its keys) for cheap detection.
- orbax: a JAX/Flax PyTree checkpoint folder, whose arrays are restored one at a time to numpy
  (never the whole tree), so a conversion holds about one array in memory.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, LmtoolError

ORBAX_INSTALL = "pip install 'lmtool[orbax]'"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- PyTorch -------------------------------------------------------------------------------------


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped, with weights_only (never arbitrary objects)."""
    try:
        try:
            data = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # The legacy (pre-zip) format cannot be mapped: it is read into memory instead.
            data = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a PyTorch checkpoint file") from None
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds objects other than tensors, which lmtool does not unpickle (weights_only)"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... on damaged files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("model_state_dict"), dict):
        data = data["model_state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected {{'model_state_dict': state dict}} or a bare state dict of tensors")
    return data


def pickle_text(path: Path) -> bytes:
    """The pickle inside a torch.save file (its keys are plain text there), without unpickling."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                return archive.read(name) if name else b""
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except (OSError, zipfile.BadZipFile):
        return b""


# --- orbax (JAX/Flax) ----------------------------------------------------------------------------


def _orbax_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("_METADATA", "checkpoint", "manifest.ocdbt"))


def orbax_root(src: Path) -> Path | None:
    """The orbax checkpoint at src, or in its only checkpoint subfolder (Kaggle's `gemma-2b/2b/`)."""
    if _orbax_dir(src):
        return src
    if not src.is_dir():
        return None
    children = [child for child in src.iterdir() if _orbax_dir(child)]
    return children[0] if len(children) == 1 else None


def orbax_metadata_text(src: Path) -> bytes:
    """The start of the orbax checkpoint's metadata files (their tree's key names), for detection."""
    root = orbax_root(src)
    if root is None:
        return b""
    text = b""
    for name in ("_METADATA", "checkpoint"):
        if (root / name).is_file():
            try:
                with open(root / name, "rb") as f:
                    text += f.read(1 << 20)
            except OSError:
                pass
    return text


def import_orbax(src: Path):
    # Restoring to numpy needs no accelerator; keep JAX from probing for one (and warning).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import numpy as np
        import orbax.checkpoint as ocp
    except ImportError:
        raise LmtoolError(f"{src}: reading orbax checkpoints needs orbax-checkpoint and jax: {ORBAX_INSTALL}") from None
    return ocp, np


def numpy_to_torch(array: Any) -> torch.Tensor:
    if not array.flags.writeable:  # torch.from_numpy shares memory and wants it writable
        array = array.copy()
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.from_numpy does not know
        return torch.from_numpy(array.view("uint16")).view(torch.bfloat16)
    return torch.from_numpy(array)


class OrbaxArrays:
    """The arrays of an orbax PyTree checkpoint, restored one at a time. Arrays are named by
    their tree path joined with '/', without a leading 'params/'."""

    what = "an orbax checkpoint of this model"  # for "no array 'x'; is this {what}?"

    def __init__(self, src: Path):
        self.src = src
        self.root = orbax_root(src) or src
        self.ocp, self.np = import_orbax(src)
        self.checkpointer = self.ocp.PyTreeCheckpointer()
        try:
            tree = self.checkpointer.metadata(self.root).item_metadata.tree
        except Exception as exc:  # orbax raises many kinds of errors for a damaged folder
            raise CheckpointError(f"{self.root}: not a readable orbax checkpoint ({first_line(exc)})") from None
        # "transformer/layer_0/attn/q_einsum/w" -> (key path in the tree, array metadata)
        self.arrays: dict[str, tuple[tuple[str, ...], Any]] = {}
        self._flatten(tree, ())
        # The last array restored: several outputs may come from one array, read it once.
        self._last: tuple[str, torch.Tensor] | None = None

    def _flatten(self, tree: Any, path: tuple[str, ...]) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                self._flatten(value, (*path, str(key)))
            return
        name = "/".join(path).removeprefix("params/")
        self.arrays[name] = (path, tree)

    def _meta(self, name: str) -> Any:
        if name not in self.arrays:
            raise CheckpointError(f"{self.root}: no array '{name}'; is this {self.what}?")
        return self.arrays[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta(name).shape)

    def array(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # release the previous array before reading the next
            self._last = (name, self._restore(name))
        return self._last[1]

    def _restore(self, name: str) -> torch.Tensor:
        path, meta = self.arrays[name]
        item: Any = self.np.zeros((), dtype=meta.dtype)
        restore_args: Any = self.ocp.RestoreArgs(restore_type=self.np.ndarray)
        for key in reversed(path):
            item, restore_args = {key: item}, {key: restore_args}
        try:
            args = self.ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        except TypeError:  # orbax before partial_restore: it could only restore the whole tree
            upgrade = ORBAX_INSTALL.replace("install", "install -U")
            raise LmtoolError(f"{self.root}: this orbax-checkpoint is too old to read one array at a time; {upgrade}") from None
        try:
            restored = self.checkpointer.restore(self.root, args=args)
        except Exception as exc:
            raise CheckpointError(f"{self.root}: cannot read array '{name}' ({first_line(exc)})") from None
        for key in path:
            restored = restored[key]
        return numpy_to_torch(restored)

    def dtype(self, name: str) -> torch.dtype:
        dtype_name = getattr(self._meta(name).dtype, "name", str(self._meta(name).dtype))  # "float32", "bfloat16"
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.root}: array '{name}' has dtype {dtype_name}, which lmtool cannot convert")
        return dtype
