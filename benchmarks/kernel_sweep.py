"""The native linear kernels alone: every frozen linear layer of a model (the LM head included),
one decode step's worth of calls, at a few activation-row counts, as GB/s of weights read.

With --against REV the kernels of another git revision run on the same mapped weights, alternating
with this tree's in one process (the order swapped every round): the host's memory bandwidth
drifts by a third within minutes, so only alternated numbers compare. The outputs are compared as
well; kernels that lay their sums out differently may differ in the last bit.

With --isa the kernels of several instruction sets this CPU has (lmtool.kernels.ISAS) alternate
the same way; --matrix N,K times one random N x K weight matrix instead of a model's layers.

From the repository root:

    python benchmarks/kernel_sweep.py --preset gemma-2b --rows 1,8
    python benchmarks/kernel_sweep.py --preset gemma-2b --rows 8 --against HEAD~1
    python benchmarks/kernel_sweep.py path/to/model --dtype float32 --repeat 10
    python benchmarks/kernel_sweep.py --matrix 16384,8192 --isa avx512,avx2,portable --rows 1,8
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lmtool
from lmtool import bench, kernels
from lmtool.inference import NativeLinear

ROOT = Path(__file__).resolve().parent.parent


def git_show(revision: str, path: str) -> str | None:
    try:
        done = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True, cwd=ROOT)
    except OSError as exc:
        raise SystemExit(f"kernel_sweep: cannot run git: {exc}") from None
    if done.returncode != 0:
        if "exists on disk, but not in" in done.stderr or "does not exist in" in done.stderr:
            return None
        raise SystemExit(f"kernel_sweep: cannot read {path} at '{revision}': {done.stderr.strip()}")
    return done.stdout


def revision_sources(revision: str, isa: kernels.Isa) -> dict[str, str]:
    """An ISA's kernel sources (file name -> text) at a git revision (read, not run): the files of
    lmtool/kernels/, or, before they existed, the AVX-512 SOURCE string of lmtool/native.py."""
    files = {name: git_show(revision, f"lmtool/kernels/{name}") for name in (*kernels.HEADERS, isa.source)}
    if all(text is not None for text in files.values()):
        return files
    legacy = git_show(revision, "lmtool/native.py")
    if legacy is not None and isa.name == "avx512":
        for node in ast.parse(legacy).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCE" for t in node.targets):
                return {isa.source: ast.literal_eval(node.value)}
    raise SystemExit(f"kernel_sweep: no {isa.name} kernel source at '{revision}'")


@dataclass
class Call:
    kernel: kernels.NativeParts
    x: torch.Tensor
    out: torch.Tensor


def native_layers(model: torch.nn.Module) -> list[NativeLinear]:
    layers = [m for m in model.modules() if isinstance(m, NativeLinear)]
    head_slices = getattr(getattr(model, "head", None), "slices", [])  # a plain list, not modules
    return layers + [s for s in head_slices if isinstance(s, NativeLinear)]


def layer_calls(layers: list[kernels.NativeParts], rows: int, dtype: torch.dtype) -> list[Call]:
    return [
        Call(layer, torch.randn(rows, layer.in_features).to(dtype), torch.empty(rows, layer.out_features, dtype=dtype))
        for layer in layers
    ]


def sweep(libraries: dict[str, ctypes.CDLL], calls: list[Call], nbytes: int, repeat: int):
    """GB/s of each library over `repeat` rounds (after one unkept warm-up round), the order
    swapped every round, and each library's outputs of the last round (written over NaN, so that
    an output one library leaves unwritten cannot pass for the other's)."""
    rates: dict[str, list[float]] = {name: [] for name in libraries}
    outputs: dict[str, torch.Tensor] = {}
    names = list(libraries)
    for round_ in range(repeat + 1):
        for name in names if round_ % 2 == 0 else names[::-1]:
            lib = libraries[name]
            if round_ == repeat:
                for call in calls:
                    call.out.fill_(float("nan"))
            start = time.perf_counter()
            for call in calls:
                call.kernel.run(call.x, call.out, lib)
            elapsed = time.perf_counter() - start
            if round_:
                rates[name].append(nbytes / elapsed / 1e9)
            if round_ == repeat:
                outputs[name] = torch.cat([call.out.float().flatten() for call in calls])
    return rates, outputs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a model folder in the standard layout")
    parser.add_argument("--preset", help="random weights of a bench preset (written once to the bench cache)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", default="1,8", help="activation rows per call, comma-separated (<= 16)")
    parser.add_argument("--repeat", type=int, default=6, help="timed rounds (>= 1)")
    parser.add_argument("--against", metavar="REV", help="also run the kernels of this git revision")
    parser.add_argument("--isa", help="instruction sets to alternate, comma-separated (default: the one in use)")
    parser.add_argument("--matrix", metavar="N,K", help="one random N x K weight matrix instead of a model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory read bandwidth probe")
    args = parser.parse_args(argv)
    if (bool(args.model) + bool(args.preset) + bool(args.matrix)) != 1:
        parser.error("give a model folder, --preset or --matrix")
    rows_list = [int(r) for r in args.rows.split(",")]
    if any(not 1 <= r <= kernels.MAX_ROWS for r in rows_list):
        parser.error(f"--rows must be between 1 and {kernels.MAX_ROWS}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    isas = [kernels.active_isa()] if not args.isa else [kernels.BY_NAME.get(n.strip()) for n in args.isa.split(",")]
    if args.isa and (None in isas or not all(kernels.runs_here(i) for i in isas)):
        parser.error(f"--isa: choose among those this CPU has: {', '.join(i.name for i in kernels.ISAS if kernels.runs_here(i))}")
    if isas[0] is None:
        raise SystemExit("kernel_sweep: the native kernels are not available here (see lmtool/kernels/__init__.py)")
    args.isas = isas
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, rows_list)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, rows_list: list[int]) -> dict:
    dtype = getattr(torch, args.dtype)
    if args.matrix:
        n, k = (int(v) for v in args.matrix.split(","))
        folder = f"random {n} x {k} matrix"
        weight = torch.randn(n, k, dtype=dtype)
        layers = [kernels.NativeParts([weight], [None], dtype)]
    else:
        folder = args.model or bench.random_checkpoint(args.preset, bench.preset_config(args.preset))
        lm = lmtool.load(folder, task="causal-lm", dtype=args.dtype, tokenizer=False)
        layers = [layer.kernel for layer in native_layers(lm.model)]
        dtype = lm.dtype
        if not layers:
            raise SystemExit(f"kernel_sweep: {folder}: no layer runs on the native kernels at {args.dtype}")
    nbytes = sum(w.numel() * w.element_size() for layer in layers for w in layer.weights)
    # The first is the reference the others' outputs are compared with.
    libraries = {"this tree" if len(args.isas) == 1 else isa.name: kernels.library_for(isa.name) for isa in args.isas}
    if args.against:
        sources = revision_sources(args.against, args.isas[0])
        libraries[args.against] = kernels.load_library(kernels.build(kernels.compiler(), args.isas[0], sources))
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"
    print(f"{folder}: {len(layers)} native layers, {size} of weights, {args.dtype}, "
          f"{args.threads} threads, medians of {args.repeat} alternating rounds, kernels: "
          f"{', '.join(isa.name for isa in args.isas)}")
    report: dict = {"bandwidth_gbps": [], "rows": {}}
    if not args.no_bandwidth:
        report["bandwidth_gbps"].append(bench.memory_read_bandwidth(args.threads))
    for rows in rows_list:
        rates, outputs = sweep(libraries, layer_calls(layers, rows, dtype), nbytes, args.repeat)
        reference = outputs[next(iter(libraries))]
        report["rows"][rows] = {}
        for name, values in rates.items():
            difference = (outputs[name] - reference).abs().max().item()
            report["rows"][rows][name] = {"median_gbps": statistics.median(values), "max_abs_diff": difference}
            reference_name = next(iter(libraries))
            same = "" if name == reference_name else f"   outputs: max |Δ| vs {reference_name} {difference:.3g}"
            print(f"{rows:3d} rows  {name:<12} {statistics.median(values):6.1f} GB/s "
                  f"[{min(values):.1f}–{max(values):.1f}]{same}")
    if not args.no_bandwidth:
        report["bandwidth_gbps"].append(bench.memory_read_bandwidth(args.threads))
        print("memory read bandwidth before / after: " + " / ".join(f"{b:.1f}" for b in report["bandwidth_gbps"]) + " GB/s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
