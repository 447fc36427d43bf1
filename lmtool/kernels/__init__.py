"""The one layer through which lmtool reaches its native CPU kernels: every family and layer calls
these functions, never the shared object.

Why: decoding multiplies a few activation rows by every weight matrix, so its speed is the rate
at which weights stream from memory. PyTorch's F.linear reaches about half the DRAM bandwidth
there; these kernels read the checkpoint's row-major weights as they are (memory-mapped, never
reordered or copied) and reach it. A float32 model whose checkpoint is bfloat16 keeps its
weights in bfloat16 and widens them in registers (exact), so it streams half the bytes. Beside
the linear layers, the step's GELU (gated or not) and its one-query attention are single calls
(`gelu_tanh_mul`, `attend_one`): in a small model the many few-microsecond operations they
replace cost as much as a third of the weight streaming.

The C source lives beside this file, one file per instruction set (`ISAS`), all sharing the
drivers in common.h: avx512.c (AVX-512 with AVX512-BF16), avx2.c (AVX2 and FMA), neon.c (aarch64,
built with and without the bf16 extension) and portable.c (plain C the compiler vectorizes); steps.c
(the per-token steps) and quant.c (weight-only int8 and int4 linear layers) go into each build. The
best set this CPU has is built with the system C compiler (CC, else gcc, else cc) into
~/.cache/lmtool/kernels under a hash of the source, compiler and flags, in about a second, the
first time a model loads, and loaded with ctypes; the shared object links the libgomp that torch
has already loaded, so it runs on torch's threads. A build that fails is reported once on stderr
with the compiler's first error line, and the next instruction set down is tried; with none,
callers use oneDNN (lmtool.inference) and PyTorch's operations.

Environment (read when the kernels are first used in a process): LMTOOL_NATIVE=0 turns the kernels off. LMTOOL_ISA=avx512|avx2|neon-bf16|neon|portable
caps the instruction set at that level (a level the CPU lacks is reported and ignored); below
avx512 (or neon-bf16) it also hides oneDNN's bfloat16 matmul, so that this machine behaves as a
CPU without native bfloat16 would (for the whole of PyTorch as well, also set
ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# Largest number of activation rows the kernels take; prefill goes to F.linear (compute-bound,
# where oneDNN's blocked GEMM is faster).
MAX_ROWS = 16
MAX_PARTS = 16
# (activation dtype, weight dtype) -> the kernel's `kind` (common.h)
KINDS = {
    (torch.bfloat16, torch.bfloat16): 0,
    (torch.float32, torch.bfloat16): 1,
    (torch.float32, torch.float32): 2,
}
SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("common.h", "plain.h", "fastmath.h")
# Compiled into every ISA's library beside its own source: the per-token elementwise and recurrent
# steps (norms, soft-cap, conv, RG-LRU, Mamba2), plain C that the ISA's flags vectorize.
STEPS_SOURCE = "steps.c"
# Compiled into every ISA's library as well: the weight-only int8 and int4 decode kernels
# (lm_int8_linear, lm_int4_linear), which read compressed-tensors codes where they lie, and the
# dequantized tiles of prefill (lm_int8_dequantize, lm_int4_dequantize).
QUANT_SOURCE = "quant.c"
# -fno-trapping-math: no kernel reads floating-point exception flags, and without it GCC keeps the
# selects of plain.h's loops as branches and leaves them scalar. -ffp-contract=off: steps.c rounds
# a product before adding it, as PyTorch does (the intrinsics' explicit FMAs are unaffected);
# -fno-math-errno lets sqrtf vectorize.
CFLAGS = ("-O3", "-fno-trapping-math", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
X86, ARM = ("x86_64", "amd64"), ("aarch64", "arm64")


@dataclass(frozen=True)
class Isa:
    """One build of the kernels: the source file, the CPUs it runs on and how it is compiled."""

    name: str
    source: str
    machines: tuple[str, ...]  # platform.machine() values, lower case; () = any
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags (x86) or Features (arm) it needs
    cflags: tuple[str, ...]
    native_bf16: bool  # bfloat16 products in hardware: also where oneDNN's bfloat16 matmul is fast


# Best first within each machine; the first one the CPU has is used (LMTOOL_ISA caps it).
ISAS = (
    Isa("avx512", "avx512.c", X86, ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma"), True),
    Isa("avx2", "avx2.c", X86, ("avx2", "fma"), ("-mavx2", "-mfma"), False),
    Isa("neon-bf16", "neon.c", ARM, ("asimd", "bf16"), ("-march=armv8.2-a+bf16",), True),
    Isa("neon", "neon.c", ARM, ("asimd",), ("-march=armv8-a",), False),
    Isa("portable", "portable.c", (), (), (), False),
)
BY_NAME = {isa.name: isa for isa in ISAS}


class BuildError(Exception):
    """The compiler failed; the message is its first error line."""


_reported: set[str] = set()


def report_once(message: str) -> None:
    """A diagnostic on stderr, once per process (a model loads its layers many times over)."""
    if message not in _reported:
        _reported.add(message)
        print(f"lmtool: {message}", file=sys.stderr)


def machine() -> str:
    return platform.machine().lower()


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; on macOS, what sysctl says of arm64)."""
    if platform.system() == "Darwin" and machine() in ARM:
        flags = {"asimd"}
        done = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        if done.stdout.strip() == "1":
            flags.add("bf16")
        return frozenset(flags)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def relevant_features() -> list[str]:
    """The CPU features the choice of kernels looks at that this CPU has (for inspect and bench)."""
    wanted = {flag for isa in ISAS for flag in isa.cpu_flags}
    return sorted(wanted & cpu_features())


def runs_here(isa: Isa) -> bool:
    return (not isa.machines or machine() in isa.machines) and set(isa.cpu_flags) <= cpu_features()


def best_isa() -> Isa:
    """The best instruction set this CPU has, whatever LMTOOL_ISA says."""
    return next(isa for isa in ISAS if runs_here(isa))


def cpu_isa() -> Isa:
    """The best instruction set this CPU has, at or below LMTOOL_ISA when that is set."""
    return capped_isa(os.environ.get("LMTOOL_ISA", "").strip().lower())


# Cached per LMTOOL_ISA value: the decode step asks (through usable()) several times per layer.
@lru_cache(maxsize=None)
def capped_isa(cap: str) -> Isa:
    here = [isa for isa in ISAS if runs_here(isa)]
    if cap:
        if cap not in BY_NAME:
            report_once(f"LMTOOL_ISA={cap} is not one of {', '.join(BY_NAME)}; ignored")
        elif BY_NAME[cap] not in here:
            report_once(f"LMTOOL_ISA={cap}: this CPU lacks it; using {here[0].name}")
        else:
            return BY_NAME[cap]
    return here[0]


def fast_bf16_matmul() -> bool:
    """Whether PyTorch's bfloat16 matmul runs on native bfloat16 instructions here (oneDNN's
    AVX512-BF16 / AMX path); without them it emulates bfloat16 at a fraction of float32's speed."""
    return cpu_isa().native_bf16 and onednn_bf16()


@lru_cache(maxsize=1)
def onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def kernel_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmtool" / "kernels"


def package_sources(isa: Isa) -> dict[str, str]:
    """The files an ISA's build compiles: its source, the step kernels and the shared headers."""
    return {name: (SOURCE_DIR / name).read_text() for name in (*HEADERS, STEPS_SOURCE, QUANT_SOURCE, isa.source)}


def first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no message")


def build(compiler: str, isa: Isa, sources: dict[str, str] | None = None) -> Path:
    """Compile one ISA's kernels once per (sources, compiler version, flags); returns the shared
    object. sources: file name -> text (default: this package's); benchmarks/kernel_sweep.py builds
    another revision's beside this one. Raises BuildError with the compiler's first error line."""
    sources = sources or package_sources(isa)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = [*CFLAGS, *isa.cflags]
    key_text = "\0".join([isa.name, isa.source, version, *flags, *(f"{n}\0{t}" for n, t in sorted(sources.items()))])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    target = kernel_cache() / f"lm_{isa.name}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text)
        built = Path(tmp) / target.name
        # An older revision's sources (kernel_sweep) may lack the step or quantized kernels.
        units = [isa.source, *(unit for unit in (STEPS_SOURCE, QUANT_SOURCE) if unit in sources)]
        done = subprocess.run(  # in the folder, so that errors name the file, not the temporary path
            [compiler, *flags, *units, "-o", built.name, "-lm"], capture_output=True, text=True, timeout=300, cwd=tmp
        )
        if done.returncode != 0:
            raise BuildError(first_error(done.stderr))
        os.replace(built, target)  # atomic: a concurrent build of the same key is harmless
    return target


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


class Part(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64)]


_i64, _ptr, _int, _float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# The exported functions and their C argument types (common.h, steps.c); a new kernel adds a row here.
ARGTYPES = {
    "lm_linear": [_int, _ptr, _i64, _i64, ctypes.POINTER(Part), _i64, _ptr, _i64],
    "lm_int8_linear": [_int, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _i64],
    "lm_int8_row_block": [_int, _i64],
    "lm_int8_int8_activations": [_int, _i64, _i64],
    "lm_int8_interleave": [_ptr, _i64, _i64, _ptr],
    "lm_int4_linear": [_int, _ptr, _i64, _i64, _i64, _ptr, _ptr, _int, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64],
    "lm_int4_int8_activations": [_int, _i64],
    "lm_int4_row_block": [_int, _i64],
    "lm_int4_interleave": [_ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr],
    "lm_int8_dequantize": [_ptr, _ptr, _i64, _i64, _int, _ptr, _i64],
    "lm_int4_dequantize": [_ptr, _ptr, _int, _i64, _ptr, _i64, _i64, _i64, _int, _ptr, _i64],
    "lm_gelu_tanh_mul": [_int, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64],
    "lm_attend_one": [
        _int, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
        _float, _ptr, _i64, _ptr, _i64, _ptr, _ptr,
    ],
    "lm_conv_step": [_int, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _i64],
    "lm_rglru_step": [_int, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _i64, _ptr],
    "lm_rms_norm": [_int, _ptr, _i64, _i64, _i64, _ptr, _int, _float, _ptr],
    "lm_add_rms_norm": [_int, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _int, _float, _ptr, _ptr],
    "lm_gated_rms_norm": [_int, _ptr, _i64, _int, _ptr, _i64, _i64, _i64, _i64, _ptr, _float, _ptr],
    "lm_soft_cap": [_int, _ptr, _i64, _float],
    "lm_ssd_step": [_int, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr],
    "lm_ssd_scan": [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr],
    "lm_mamba2_step": [
        _int, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
        _ptr, _i64, _float, _ptr,
    ],
    "lm_add_layer_norm": [_int, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _float, _ptr, _ptr],
    "lm_kv_append": [_int, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64],
    "lm_rope": [_int, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr],
    "lm_attention_step": [
        _int, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _float,
        _ptr, _i64, _ptr, _ptr, _ptr,
    ],
}
# Functions that return a status (0 = done) or an answer; the others return nothing.
RETURNS_INT = ("lm_int8_linear", "lm_int4_linear", "lm_gated_rms_norm", "lm_ssd_step", "lm_ssd_scan", "lm_mamba2_step",
               "lm_int4_int8_activations", "lm_int4_row_block", "lm_int8_row_block",
               "lm_int8_int8_activations")
RETURNS_I64 = ("lm_int8_interleave",)  # counts


def load_library(path: Path) -> ctypes.CDLL:
    """A built kernels object with the argument types of the functions it has declared (an older
    revision's, built by benchmarks/kernel_sweep.py, may lack the later ones)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in ARGTYPES.items():
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int if name in RETURNS_INT else ctypes.c_int64 if name in RETURNS_I64 else None
    return lib


@lru_cache(maxsize=None)
def library_for(name: str) -> ctypes.CDLL | None:
    """One ISA's kernels, built and loaded once per process; None (reported once) when they
    cannot be built here. Tests use it to run every ISA this CPU can."""
    isa = BY_NAME[name]
    cc = compiler()
    if cc is None:
        report_once("no C compiler (set CC, or install gcc): native kernels off; using PyTorch's operations")
        return None
    try:
        return load_library(build(cc, isa))
    except BuildError as exc:
        report_once(f"the {name} kernels did not build with {cc}: {exc}")
    except (OSError, subprocess.SubprocessError) as exc:
        report_once(f"the {name} kernels could not be built or loaded with {cc}: {exc}")
    return None


@lru_cache(maxsize=1)
def active_isa() -> Isa | None:
    """The instruction set whose kernels run here, or None when they are off or failed to build.
    Decided at the first use in a process (the decode step asks several times per layer, so it
    does not read the environment each time); refresh() decides again."""
    if os.environ.get("LMTOOL_NATIVE", "1") == "0":
        return None
    # A build that fails (a compiler too old for -mavx512bf16, say) falls back to the next level.
    chosen = cpu_isa()
    for isa in ISAS[ISAS.index(chosen):]:
        if runs_here(isa) and library_for(isa.name) is not None:
            return isa
    return None


def refresh() -> None:
    """Read LMTOOL_NATIVE and LMTOOL_ISA again (for tests that change them)."""
    active_isa.cache_clear()


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be used here (see the module docstring)."""
    isa = active_isa()
    return library_for(isa.name) if isa else None


def available() -> bool:
    return library() is not None


def describe() -> dict:
    """What runs here, for inspect, bench and generate --verbose."""
    isa = active_isa()
    off = os.environ.get("LMTOOL_NATIVE", "1") == "0"
    return {
        "kernels": isa.name if isa else None,
        "kernels_off": "LMTOOL_NATIVE=0" if off else (None if isa else "build failed or no compiler"),
        "isa_cap": os.environ.get("LMTOOL_ISA") or None,
        "machine": machine(),
        "cpu_features": relevant_features(),
        "native_bf16_matmul": fast_bf16_matmul(),
    }


def supports(activation: torch.dtype, weight: torch.dtype) -> bool:
    return (activation, weight) in KINDS


class NativeParts:
    """Weight parts [N_i, K] (and optional biases) multiplied by the kernels in one call, their
    outputs side by side: y[M, sum N_i] = x[M, K] . concat(W_i)^T + concat(b_i)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], activation: torch.dtype):
        if len(weights) > MAX_PARTS:
            raise ValueError(f"at most {MAX_PARTS} parts")
        self.weights = [w.contiguous() for w in weights]
        self.biases = [b.contiguous() if b is not None else None for b in biases]
        self.kind = KINDS[(activation, self.weights[0].dtype)]
        self.in_features = self.weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in self.weights)
        # Built once: the tensors never move, so their addresses stay valid.
        self.parts = (Part * len(weights))(
            *[Part(w.data_ptr(), b.data_ptr() if b is not None else None, w.shape[0]) for w, b in zip(self.weights, self.biases)]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] contiguous, M <= MAX_ROWS, in the activation dtype -> [M, N]."""
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        self.run(x, y)
        return y

    def run(self, x: torch.Tensor, y: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
        """y [M, N] = x [M, K] . W^T (+ b), both contiguous; lib: another build of the kernels
        (benchmarks/kernel_sweep.py), else this tree's."""
        (lib or library()).lm_linear(*self.arguments(x.data_ptr(), x.shape[0], y.data_ptr(), self.out_features))

    def bind_at(self, x: int, rows: int, y: int, ldy: int, lib: ctypes.CDLL | None = None):
        """The same call on addresses, arguments bound (a captured step binds it once and makes it
        every token): x [rows, K] contiguous, output rows ldy elements apart (a column slice of a
        wider buffer)."""
        return bound((lib or library()).lm_linear, *self.arguments(x, rows, y, ldy))

    def arguments(self, x: int, rows: int, y: int, ldy: int) -> tuple:
        """lm_linear's arguments for x [rows, K] into output rows ldy elements apart (run, bind_at)."""
        return self.kind, x, rows, self.in_features, self.parts, len(self.weights), y, ldy


def bound(function, *arguments) -> functools.partial:
    """function(*arguments), its Python numbers converted to the function's C types now rather than
    at every call: a captured decode step makes the same ~150 calls every token (with 15 arguments,
    0.66 us a call where ctypes converting them each time took 1.14; Zen 5)."""
    converted = (
        kind(value) if isinstance(value, (int, float)) or value is None else value
        for kind, value in zip(function.argtypes, arguments, strict=True)
    )
    return functools.partial(function, *converted)


# --- the decode step's elementwise and attention kernels ------------------------------------------


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: CPU, bfloat16 or float32 alike, and no
    autograd (the kernels have no backward; training keeps PyTorch's operations)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.bfloat16, torch.float32)
        and all(t.dtype == first.dtype and t.device == first.device for t in present)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and available()
    )


def rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [rows, n] with unit stride along n (a view when it can be) and the row stride."""
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) < flat.shape[1]):
        flat = flat.contiguous()
    return flat, flat.stride(0)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up (or just the GELU), in one pass; float32 inside, one
    rounding. gate and up may be column slices of one fused projection output."""
    g, g_stride = rows_of(gate)
    u, u_stride = rows_of(up) if up is not None else (None, 0)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    library().lm_gelu_tanh_mul(
        int(gate.dtype == torch.bfloat16), g.data_ptr(), g_stride, u.data_ptr() if u is not None else None,
        u_stride, out.data_ptr(), gate.shape[-1], g.shape[0], gate.shape[-1],
    )
    return out


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence: q [B,H,1,hd], k/v [B,KV,S,hd] (views of a KV
    cache: rows of hd contiguous), bias [B*H, S] added to the scaled scores (ALiBi) or None,
    mask the step's boolean attention mask [B,1,1,S] (True = visible; layers.causal_mask) or None
    -> [B,H,1,hd] (a view of [B,1,H,hd], so the caller's transpose back is free). Softmax in
    float32."""
    B, H, _, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    for cached in (k, v):
        if cached.stride(-1) != 1 or cached.stride(-2) != hd or cached.stride() != k.stride():
            raise ValueError("attend_one: keys and values must be KV-cache views with rows of head_dim")
    bias, bias_stride = rows_of(bias.reshape(B * H, S)) if bias is not None else (None, 0)
    # [B,S]: the mask's one query row
    key_mask, mask_stride = rows_of(mask[:, 0, 0, :S]) if mask is not None else (None, 0)
    out = torch.empty(B, 1, H, hd, dtype=q.dtype, device=q.device)
    scores = torch.empty(B * H * S, dtype=torch.float32, device=q.device)
    library().lm_attend_one(
        int(q.dtype == torch.bfloat16), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
        k.stride(0), k.stride(1), B, H, KV, S, hd, scale,
        bias.data_ptr() if bias is not None else None, bias_stride,
        key_mask.data_ptr() if key_mask is not None else None, mask_stride,
        out.data_ptr(), scores.data_ptr(),
    )
    return out.transpose(1, 2)
