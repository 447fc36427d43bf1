"""The native linear kernels alone: every frozen linear layer of a model (the LM head included),
one decode step's worth of calls, at a few activation-row counts, as GB/s of weights read.

With --against REV the kernels of another git revision run on the same mapped weights, alternating
with this tree's in one process (the order swapped every round): the host's memory bandwidth
drifts by a third within minutes, so only alternated numbers compare. The outputs are compared as
well; kernels that lay their sums out differently may differ in the last bit.

From the repository root:

    python benchmarks/kernel_sweep.py --preset gemma-2b --rows 1,8
    python benchmarks/kernel_sweep.py --preset gemma-2b --rows 8 --against HEAD~1
    python benchmarks/kernel_sweep.py path/to/model --dtype float32 --repeat 10
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


def revision_source(revision: str) -> str:
    """The kernels' C source as lmtool/native.py holds it at a git revision (read, not run)."""
    try:
        done = subprocess.run(
            ["git", "show", f"{revision}:lmtool/native.py"], capture_output=True, text=True, cwd=ROOT
        )
    except OSError as exc:
        raise SystemExit(f"kernel_sweep: cannot run git: {exc}") from None
    if done.returncode != 0:
        raise SystemExit(f"kernel_sweep: cannot read lmtool/native.py at '{revision}': {done.stderr.strip()}")
    for node in ast.parse(done.stdout).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"kernel_sweep: lmtool/native.py at '{revision}' has no kernel SOURCE")


@dataclass
class Call:
    kernel: kernels.NativeParts
    x: torch.Tensor
    out: torch.Tensor


def native_layers(model: torch.nn.Module) -> list[NativeLinear]:
    layers = [m for m in model.modules() if isinstance(m, NativeLinear)]
    head_slices = getattr(getattr(model, "head", None), "slices", [])  # a plain list, not modules
    return layers + [s for s in head_slices if isinstance(s, NativeLinear)]


def layer_calls(layers: list[NativeLinear], rows: int, dtype: torch.dtype) -> list[Call]:
    return [
        Call(layer.kernel, torch.randn(rows, layer.in_features).to(dtype),
             torch.empty(rows, layer.out_features, dtype=dtype))
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory read bandwidth probe")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.preset):
        parser.error("give a model folder or --preset")
    rows_list = [int(r) for r in args.rows.split(",")]
    if any(not 1 <= r <= kernels.MAX_ROWS for r in rows_list):
        parser.error(f"--rows must be between 1 and {kernels.MAX_ROWS}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not kernels.available():
        raise SystemExit("kernel_sweep: the native kernels are not available here (see lmtool/native.py)")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, rows_list)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, rows_list: list[int]) -> dict:
    folder = args.model or bench.random_checkpoint(args.preset, bench.preset_config(args.preset))
    lm = lmtool.load(folder, task="causal-lm", dtype=args.dtype, tokenizer=False)
    layers = native_layers(lm.model)
    if not layers:
        raise SystemExit(f"kernel_sweep: {folder}: no layer runs on the native kernels at {args.dtype}")
    nbytes = sum(w.numel() * w.element_size() for layer in layers for w in layer.weights)
    libraries = {"this tree": kernels.library()}
    if args.against:
        libraries[args.against] = kernels.load_library(kernels.build(kernels.compiler(), revision_source(args.against)))
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"
    print(f"{folder}: {len(layers)} native layers, {size} of weights, {args.dtype}, "
          f"{args.threads} threads, medians of {args.repeat} alternating rounds")
    report: dict = {"bandwidth_gbps": [], "rows": {}}
    if not args.no_bandwidth:
        report["bandwidth_gbps"].append(bench.memory_read_bandwidth(args.threads))
    for rows in rows_list:
        rates, outputs = sweep(libraries, layer_calls(layers, rows, lm.dtype), nbytes, args.repeat)
        reference = outputs["this tree"]
        report["rows"][rows] = {}
        for name, values in rates.items():
            difference = (outputs[name] - reference).abs().max().item()
            report["rows"][rows][name] = {"median_gbps": statistics.median(values), "max_abs_diff": difference}
            same = "" if name == "this tree" else f"   outputs: max |Δ| vs this tree {difference:.3g}"
            print(f"{rows:3d} rows  {name:<12} {statistics.median(values):6.1f} GB/s "
                  f"[{min(values):.1f}–{max(values):.1f}]{same}")
    if not args.no_bandwidth:
        report["bandwidth_gbps"].append(bench.memory_read_bandwidth(args.threads))
        print("memory read bandwidth before / after: " + " / ".join(f"{b:.1f}" for b in report["bandwidth_gbps"]) + " GB/s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
