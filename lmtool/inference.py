"""Loading a model for CPU inference: every linear layer frozen on the fastest backend here.

Decoding multiplies a few activation rows by every weight matrix, so its speed is the rate at
which weights stream from memory, and PyTorch's F.linear reaches only about half of it. Two
backends do better; load picks one per model:

- native (lmtool.native): kernels that read the checkpoint's memory-mapped weights in place.
  Nothing is copied at load (a float32 model from a bfloat16 file keeps bfloat16 weights and
  widens them in registers), so loading costs no more than mapping the file. Batches above
  kernels.MAX_ROWS rows (prefill) go to F.linear, which is compute-bound and fast there.
- onednn: the weight is reordered once into oneDNN's blocked layout, which its matmul streams
  about twice as fast as F.linear at batch 1 and which is at least as fast at prefill. Reordering
  costs time at load (about 1-2 GB/s) and the packed copy replaces the mapped original: its pages
  are dropped right after (`release`). Used where the native kernels cannot be built.

Both fuse q/k/v and gate/up into one call (native: one kernel call over the separate tensors;
onednn: one matrix, concatenated while packing). The input embedding is never copied: lookups
read the rows they need from the mapped file, cast as they are read, and a tied LM head uses the
same tensor (onednn: packs it in slices, so a cast never holds a second full copy).

A frozen model is for inference: its state_dict keeps the checkpoint's names (weights are joined
or unpacked on the way out), but it cannot be trained, cast or moved afterwards.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .heads import CausalLMHead
from .kernels import steps as step_kernels

# Rows of a tied LM head packed (onednn) or cast for F.linear (native, prefill) at a time: bounds
# the temporary copy.
SLICE_BYTES = 256 * 2**20
def backend_for(dtype: torch.dtype, device: torch.device) -> str | None:
    """'native', 'onednn', or None (plain nn.Linear) for a model of this dtype on this device."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    if kernels.available():
        return "native"
    if not torch.backends.mkldnn.is_available():
        return None
    if dtype == torch.bfloat16 and not kernels.fast_bf16_matmul():
        return None
    return "onednn"


def backend_label(dtype: torch.dtype, device: torch.device) -> str:
    """backend_for in words: 'kernels (avx2)', 'oneDNN' or 'PyTorch'."""
    backend = backend_for(dtype, device)
    if backend == "native":
        return f"kernels ({kernels.active_isa().name})"
    return "oneDNN" if backend == "onednn" else "PyTorch"


def runtime(device: torch.device = torch.device("cpu")) -> dict:
    """What runs a model's linear layers here, for inspect, bench and generate --verbose: the
    backend per dtype, the kernels' instruction set (None when off, and why), the CPU features that
    chose them, and how a bfloat16 prefill multiplies."""
    info = kernels.describe()
    backends = {name: backend_label(dtype, device) for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    if backend_for(torch.bfloat16, device) != "native" or kernels.fast_bf16_matmul():
        prefill = "bfloat16"
    else:
        prefill = "float32 from widened bfloat16 weights"
    return {"backend": backends, **info, "bfloat16_prefill": prefill}


def runtime_lines(info: dict) -> list[str]:
    """runtime() as two lines of text: the backend per dtype, then the kernels and the CPU."""
    backends = ", ".join(f"{dtype} {label}" for dtype, label in info["backend"].items())
    return [f"linear layers: {backends}; bfloat16 prefill in {info['bfloat16_prefill']}", cpu_line(info)]


def cpu_line(info: dict) -> str:
    features = " ".join(info["cpu_features"]) or "none of " + ", ".join(isa.name for isa in kernels.ISAS[:-1])
    kernels_line = info["kernels"] or f"off ({info['kernels_off']})"
    if info["isa_cap"]:
        kernels_line += f" (LMTOOL_ISA={info['isa_cap']})"
    native = "" if info["native_bf16_matmul"] else " (no native bfloat16 matmul)"
    return f"kernels: {kernels_line}; CPU {info['machine']}: {features}{native}"


def runtime_summary(dtype: torch.dtype, device: torch.device) -> list[str]:
    """What runs a loaded model of this dtype on this device, as lines of text (generate --verbose)."""
    info = runtime(device)
    line = f"linear layers ({str(dtype).removeprefix('torch.')} on {device}): {backend_label(dtype, device)}"
    if dtype == torch.bfloat16 and backend_for(dtype, device) == "native":
        line += f"; prefill in {info['bfloat16_prefill']}"
    return [line, cpu_line(info)]


def row_slices(table: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Views of consecutive rows of table, each at most SLICE_BYTES once in dtype."""
    rows = max(1, SLICE_BYTES // (table.shape[1] * torch.finfo(dtype).bits // 8))
    return list(table.split(rows))


@lru_cache(maxsize=1)
def onednn_float32_matmul() -> bool:
    """Whether oneDNN's matmul takes plain row-major float32 weights here (a CPU build with
    oneDNN). Checked once on a product whose result is known, so a build without the operator,
    or one that rejects unpacked weights, falls back to F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4), "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.equal(out, torch.full((2, 4), 4.0))


def prefill_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x . weight^T + bias for many rows (prefill). In float32, oneDNN's matmul on the plain
    weight: 1.2x the speed of F.linear's MKL sgemm at 512 rows on an AMD Zen 4 and 1.8x at 64
    (benchmarks/prefill_gemm.py), still a strict float32 product (only the summation order differs),
    with the bias added inside the product rather than by a second pass over the output."""
    if x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and onednn_float32_matmul():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class CastScratch:
    """One buffer that the bfloat16 weights of a float32 model are cast into for prefill, reused
    by every layer: a fresh allocation per cast would fault in new pages each time, which costs
    more than the cast itself."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def cast(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.buffer is None or self.buffer.dtype != dtype or self.buffer.numel() < rows.numel():
            self.buffer = torch.empty(rows.numel(), dtype=dtype, device=rows.device)
        return self.buffer[: rows.numel()].view(rows.shape).copy_(rows)


def owner_prefix(prefix: str) -> str:
    """A fused layer's state_dict prefix "<owner>.<fused name>." -> "<owner>.": its parts' entries
    live beside it, under their own names."""
    return prefix[: prefix.rstrip(".").rfind(".") + 1]


class FrozenLinear(nn.Module):
    """An inference-only linear layer. A fused one keeps the names and row counts of the layers it
    joins (`parts`), so its state_dict entries are theirs."""

    def __init__(self, dtype: torch.dtype, biases: list[torch.Tensor | None], parts: list[tuple[str, int]] | None):
        super().__init__()
        self.dtype = dtype
        self.biases = biases
        self.parts = parts

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each part (q, k, v...), as the separate layers would give them."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.forward_parts(x)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def dense_weights(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight in the model's dtype, rebuilt on each access (slow: for code that
        slices it, and for saving)."""
        weights = self.dense_weights()
        return weights[0] if len(weights) == 1 else torch.cat(weights)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.biases[0] is None else torch.cat(self.biases)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.parts is None:
            destination[prefix + "weight"] = self.weight
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias
            return
        owner = owner_prefix(prefix)
        for (name, _), weight, bias in zip(self.parts, self.dense_weights(), self.biases):
            destination[f"{owner}{name}.weight"] = weight
            if bias is not None:
                destination[f"{owner}{name}.bias"] = bias


class NativeLinear(FrozenLinear):
    """Weights used where they lie (mapped checkpoint tensors); native kernels up to
    kernels.MAX_ROWS activation rows, F.linear beyond."""

    def __init__(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        dtype: torch.dtype,
        scratch: CastScratch,
        parts=None,
    ):
        super().__init__(dtype, biases, parts)
        self.weights = weights
        self.scratch = scratch
        self.kernel = kernels.NativeParts(weights, biases, dtype)
        # Prefill of a bfloat16 model on a CPU without native bfloat16 matmul (AVX2, NEON without
        # BF16): PyTorch would emulate bfloat16 at a fraction of float32's speed, so the product is
        # taken in float32 from weights widened a slice at a time, and rounded once at the end.
        self.compute_dtype = torch.float32 if dtype == torch.bfloat16 and not kernels.fast_bf16_matmul() else dtype
        self.in_features = self.kernel.in_features
        self.out_features = self.kernel.out_features

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= kernels.MAX_ROWS:
            # One kernel call writes every part side by side; the parts are views of it.
            out = self.kernel(flat.contiguous()).view(*x.shape[:-1], self.out_features)
            return list(out.split([w.shape[0] for w in self.weights], dim=-1))
        # Prefill: F.linear per part (no copy to join them).
        return [self.dense_linear(flat, w, b).view(*x.shape[:-1], -1) for w, b in zip(self.weights, self.biases)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= kernels.MAX_ROWS:
            return self.kernel(flat.contiguous()).view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        compute = self.compute_dtype
        if weight.dtype == x.dtype == compute:
            return prefill_linear(x, weight, bias)
        # bfloat16 weights of a float32 model, or a bfloat16 model computed in float32: cast a
        # slice at a time into the shared scratch, not the whole matrix.
        wide = x.to(compute).contiguous()
        slices = row_slices(weight, compute)
        biases = [None] * len(slices) if bias is None else list(bias.to(compute).split([s.shape[0] for s in slices]))
        outs = [prefill_linear(wide, self.scratch.cast(rows, compute), b) for rows, b in zip(slices, biases)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out.to(x.dtype)

    def dense_weights(self) -> list[torch.Tensor]:
        return [w.to(self.dtype) for w in self.weights]


class PackedLinear(FrozenLinear):
    """The weight (parts concatenated) reordered into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts=None):
        rows = [r for _, r in parts] if parts else [weight.shape[0]]
        biases = list(bias.split(rows)) if bias is not None else [None] * len(rows)
        super().__init__(weight.dtype, biases, parts)
        self.rows = rows
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.joined_bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.joined_bias, "none", [], "")

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.forward(x).split(self.rows, dim=-1))

    def dense_weights(self) -> list[torch.Tensor]:
        return list(self.packed.to_dense().split(self.rows))


class FrozenCausalLMHead(CausalLMHead):
    """The LM head over frozen linears covering consecutive row slices of its weight."""

    def __init__(self, head: CausalLMHead, slices: list[FrozenLinear]):
        nn.Module.__init__(self)
        # A plain list, not child modules: the state_dict holds the one joined weight.
        self.slices = slices
        self.soft_cap = head.soft_cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = [s(hidden) for s in self.slices]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if self.soft_cap is not None:
            # In place (the logits are this call's own): the same roundings as CausalLMHead's,
            # without two more vocabulary-sized allocations per step; one native pass when it can.
            if logits.is_contiguous() and step_kernels.usable(logits):
                step_kernels.soft_cap_(logits, self.soft_cap)
            else:
                logits.div_(self.soft_cap).tanh_().mul_(self.soft_cap)
        return logits

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = torch.cat([s.weight for s in self.slices])


class CastEmbedding(nn.Module):
    """An embedding that looks rows up in the checkpoint's tensor and casts only those rows, so
    a float32 model from a bfloat16 file never holds a float32 copy of the whole table."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.table).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight


class FrozenBlockDiagonal(nn.Module):
    """Block-diagonal maps over one input, y_m[:, h] = x[:, h] @ W_m[h] + b_m[h] (RecurrentGemma's
    RG-LRU gates, W_m [blocks, in, out]), for up to kernels.MAX_ROWS rows: each block's weights are
    transposed once at load into the [out, in] rows the native kernels read (a copy of a few MB per
    layer; torch's bfloat16 baddbmm reads them at a quarter of the bandwidth at batch 1), and one
    kernel call per block computes every map. Larger inputs stay with the owner's own tensors."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], source: "WeightSource"):
        super().__init__()
        self.block_width = weights[0].shape[2]
        self.maps = len(weights)
        self.blocks = []
        for h in range(weights[0].shape[0]):
            rows = [source.cast(w[h].T.contiguous(), source.weight_dtype(w)) for w in weights]
            self.blocks.append(kernels.NativeParts(rows, [b[h] for b in biases], source.dtype))
        for w in weights:
            source.release_pages(w)  # read once to transpose; the owner's copy faults back in if used

    def takes(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= kernels.MAX_ROWS and not torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [N, blocks, in] -> one [N, blocks, out] per map."""
        by_block = x.transpose(0, 1).contiguous()  # [blocks, N, in]: each block's rows contiguous
        out = torch.empty(len(self.blocks), x.shape[0], self.maps * self.block_width, dtype=x.dtype, device=x.device)
        for block, parts in enumerate(self.blocks):
            parts.run(by_block[block], out[block])
        return list(out.transpose(0, 1).split(self.block_width, dim=-1))


class WeightSource:
    """The checkpoint's tensors under our parameter names, still mapped; `done` marks them used
    and drops their pages when they were copied."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        backend: str,
        release: Callable[[torch.Tensor], None],
    ):
        self.tensors = tensors
        self.dtype = dtype
        self.backend = backend
        self.release_pages = release
        self.consumed: set[str] = set()
        self.scratch = CastScratch()  # shared by the model's NativeLinear layers

    def has(self, name: str) -> bool:
        return name in self.tensors

    def weight_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        """What the backend computes with: native keeps a float32 model's bfloat16 weights."""
        if self.backend == "native" and kernels.supports(self.dtype, tensor.dtype):
            return tensor.dtype
        return self.dtype

    def cast(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor

    def done(self, names: list[str], copied: bool) -> None:
        for name in names:
            self.consumed.add(name)
            if copied:
                self.release_pages(self.tensors[name])


def freeze_linears(owner: nn.Module, prefix: str, names: list[str], fused_name: str | None, source: WeightSource) -> None:
    """Replace owner's linear layers `names` by one frozen layer (under fused_name when several)."""
    layers = [getattr(owner, n) for n in names]
    weight_names = [f"{prefix}{n}.weight" for n in names]
    bias_names = [f"{prefix}{n}.bias" if layer.bias is not None else None for n, layer in zip(names, layers)]
    parts = [(n, layer.out_features) for n, layer in zip(names, layers)] if fused_name else None
    weights = [source.tensors[w] for w in weight_names]
    biases = [source.cast(source.tensors[b]) if b else None for b in bias_names]
    if source.backend == "native":
        kept = [source.cast(w, source.weight_dtype(w)) for w in weights]
        frozen: FrozenLinear = NativeLinear(kept, biases, source.dtype, source.scratch, parts)
        copied = any(k is not w for k, w in zip(kept, weights))
    else:
        joined = source.cast(weights[0] if len(weights) == 1 else torch.cat(weights))
        bias = None if biases[0] is None else torch.cat(biases)
        frozen = PackedLinear(joined, bias, parts)
        copied = True
    source.done(weight_names, copied)
    source.done([b for b in bias_names if b], copied=False)
    for n in names:
        delattr(owner, n)
    setattr(owner, fused_name or names[0], frozen)


def fusable(module: nn.Module) -> tuple[str, list[str]] | None:
    """The group of linear layers a module declares to be called as one (`fusion`: the fused
    module's name and the checkpoint's module names), e.g. q/k/v or gate/up. A module whose
    forward does not go through the fused path (a LoRA-adapted projection) declares None."""
    return getattr(type(module), "fusion", None)


def freeze_head(model: nn.Module, source: WeightSource, embedding_name: str) -> None:
    """The LM head (tied: over the embedding's tensor). onednn packs it in row slices, dropping
    each slice's pages once packed; an embedding lookup faults back in only the rows it reads."""
    head_name = f"{model.head_name}.weight"
    table = source.tensors[embedding_name if model.tied else head_name]
    if source.backend == "native":
        weight = source.cast(table, source.weight_dtype(table))
        slices: list[FrozenLinear] = [NativeLinear([weight], [None], source.dtype, source.scratch)]
        if weight is not table:
            source.release_pages(table)
    else:
        slices = []
        for rows in row_slices(table, source.dtype):
            slices.append(PackedLinear(source.cast(rows), None))
            source.release_pages(rows)
    setattr(model, model.head_name, FrozenCausalLMHead(model.head, slices))
    source.consumed.add(head_name)


def load_frozen(model: nn.Module, source: WeightSource) -> None:
    """Freeze every linear layer of a meta-built TaskModel from source, fusing q/k/v and gate/up,
    and set up its embedding; the caller assigns whatever is left in source (norms, biases...)."""
    backbone = model.backbone
    attr = next(n for n, m in backbone.named_children() if m is backbone.embed_tokens)
    embedding_name = f"{model.backbone_prefix}.{attr}.weight"
    # A quantized head or embedding was swapped in already (lmtool.quantize.linear) and is not in source.
    if model.task == "causal-lm" and source.has(embedding_name if model.tied else f"{model.head_name}.weight"):
        freeze_head(model, source, embedding_name)
    for prefix, module in list(model.named_modules()):
        prefix = f"{prefix}." if prefix else ""
        group = fusable(module)
        if group and all(source.has(f"{prefix}{n}.weight") for n in group[1]):
            freeze_linears(module, prefix, group[1], group[0], source)
    for prefix, module in list(model.named_modules()):
        prefix = f"{prefix}." if prefix else ""
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and source.has(f"{prefix}{name}.weight"):
                freeze_linears(module, prefix, [name], None, source)
    for prefix, module in list(model.named_modules()):
        # Modules with weights of their own shape (not nn.Linear) set up their frozen form.
        freeze = getattr(module, "freeze", None)
        if callable(freeze):
            freeze(source, f"{prefix}." if prefix else "")
    table = source.tensors.get(embedding_name)
    if table is not None and table.dtype != source.dtype:
        setattr(backbone, attr, CastEmbedding(table, source.dtype))
        source.done([embedding_name], copied=False)
