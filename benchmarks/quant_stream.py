"""The int8 and int4 decode kernels streaming a weight from memory, against the bfloat16 kernel
streaming the same number of bytes, at one activation row: where the quantized kernels fall
behind the memory's rate, and whether a change to lmtool/kernels/quant.c helps.

The host's read rate moves by half within seconds, so every round runs the bfloat16 stream and
then each quantized one back to back, and the rounds are binned by the bfloat16 rate they saw
(where memory answers slowly every kernel streams at its rate; where it answers fast, differences
in arithmetic or access pattern would show). Bytes count everything the kernel
reads (codes or nibbles, scales, zero points). With --against REV, quant.c of another git revision
is built beside this tree's and the two alternate on the same weight (the order swapped every
round); their outputs must be equal (so REV must pack the interleaved zero points into nibbles, as
lmtool has since 2026-12-05 13:00).

From the repository root (LMTOOL_ISA=avx2 caps an AVX-512 machine to AVX2):

    python benchmarks/quant_stream.py                        # int4 g64 and int8, 600 MB each
    python benchmarks/quant_stream.py --bits 4 --against HEAD~1 --rounds 200
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lmtool import kernels
from lmtool.quantize import linear
from lmtool.quantize.format import QuantizedWeight, compressed_tensors
from lmtool.quantize.schemes import quantize_int4_groups, quantize_int8_rows

ROOT = Path(__file__).resolve().parent.parent
BINS = ((55, float("inf")), (45, 55), (0, 45))  # the bfloat16 stream's GB/s


class InMemory:
    """prepare() drops a checkpoint's pages through it; these weights are in memory."""

    def release(self, tensor: torch.Tensor) -> None:
        pass

    def holds(self, tensor: torch.Tensor) -> bool:
        return True


def weight_of(bits: int, megabytes: int, K: int, group: int) -> QuantizedWeight:
    """A weight of about `megabytes` of codes or nibbles, K wide: a 4096-row random weight repeated
    (quantizing 600 MB of random values would take minutes), prepared as a bfloat16 model loads it
    (interleaved where this build's kernel reads rows interleaved)."""
    torch.manual_seed(0)
    rows = max(8, 2**23 // K)
    copies = max(1, megabytes * 2**20 * (2 if bits == 4 else 1) // (rows * K))
    N = rows * copies
    if bits == 4:
        q = quantize_int4_groups(torch.randn(rows, K), group, torch.bfloat16, search=False)
        stored = compressed_tensors(q, (rows, K))
        weight = QuantizedWeight("w", N, K, 4, q.scale.repeat(copies, 1), q.zero_point.repeat(copies, 1),
                                 nibbles=stored["weight_packed"].view(torch.uint8).repeat(copies, 1))
    else:
        q = quantize_int8_rows(torch.randn(rows, K), torch.bfloat16)
        stored = compressed_tensors(q, (rows, K))
        weight = QuantizedWeight("w", N, K, 8, stored["weight_scale"].repeat(copies, 1), None,
                                 codes=stored["weight"].repeat(copies, 1))
    linear.prepare(weight, InMemory(), torch.bfloat16)
    return weight


def streamed_bytes(weight: QuantizedWeight) -> int:
    parts = [weight.nibbles if weight.bits == 4 else weight.codes, weight.scale]
    zeros = 0 if weight.zero_point is None else weight.zero_points_at(weight.out_features)  # packed where interleaved
    return sum(t.numel() * t.element_size() for t in parts) + zeros


def library_at(revision: str, isa: kernels.Isa):
    """This tree's kernels with quant.c as it was at `revision`."""
    done = subprocess.run(["git", "show", f"{revision}:lmtool/kernels/quant.c"], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"quant_stream: cannot read quant.c at '{revision}': {done.stderr.strip()}")
    sources = kernels.package_sources(isa) | {"quant.c": done.stdout}
    return kernels.load_library(kernels.build(kernels.compiler(), isa, sources))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(4, 8), action="append", help="4, 8 or both (default)")
    parser.add_argument("--mb", type=int, default=600, help="megabytes of codes or nibbles (default 600)")
    parser.add_argument("--k", type=int, default=2048, help="input width (default 2048, Gemma-2B's)")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--against", metavar="REV", help="also run quant.c of this git revision, alternating")
    args = parser.parse_args()
    isa = kernels.active_isa()
    if isa is None:
        raise SystemExit("quant_stream: lmtool's kernels are off here (LMTOOL_NATIVE=0 or no compiler)")
    libraries = {"this tree": kernels.library()}
    if args.against:
        libraries[args.against] = library_at(args.against, isa)
    chosen = ["this tree"]
    kernels.library = lambda: libraries[chosen[0]]  # what bind_native_matmul_at binds to
    print(f"kernels {isa.name}; {args.rounds} rounds")

    for bits in args.bits or [4, 8]:
        weight = weight_of(bits, args.mb, args.k, args.group)
        size = streamed_bytes(weight)
        x = torch.randn(1, args.k, dtype=torch.bfloat16)
        outputs, calls = {}, {}
        for name in libraries:
            chosen[0] = name
            outputs[name] = torch.empty(1, weight.out_features, dtype=torch.bfloat16)
            calls[name] = linear.bind_native_matmul_at(weight, 1, x.data_ptr(), args.k, 1, outputs[name].data_ptr(),
                                                       weight.out_features)
            calls[name]()
        first = outputs["this tree"]
        if any(not torch.equal(first, out) for out in outputs.values()):
            raise SystemExit("quant_stream: the two revisions' outputs differ")
        # In 2 MB pages on both sides: a bfloat16 model's weights are read from the mapped file's
        # 2 MB folios and the quantized copies are made in 2 MB pages (linear._in_huge_pages).
        dense_weight = linear._in_huge_pages(torch.empty(size // 2 // args.k, args.k, dtype=torch.bfloat16))
        dense = kernels.NativeParts([dense_weight.normal_()], [None], torch.bfloat16)
        dense_out = torch.empty(1, dense.out_features, dtype=torch.bfloat16)
        dense_call = dense.bind_at(x.data_ptr(), 1, dense_out.data_ptr(), dense.out_features, libraries["this tree"])
        dense_bytes = dense.out_features * args.k * 2

        bf16_rate, rate = [], {name: [] for name in libraries}
        order = list(libraries)
        for r in range(args.rounds):
            start = time.perf_counter()
            dense_call()
            bf16_rate.append(dense_bytes / (time.perf_counter() - start) / 1e9)
            for name in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                calls[name]()
                rate[name].append(size / (time.perf_counter() - start) / 1e9)

        print(f"int{bits}{f' g{args.group}' if bits == 4 else ''}: {size / 1e6:.0f} MB a call "
              f"({weight.interleaved} of {weight.out_features} rows interleaved); bfloat16 "
              f"{statistics.median(bf16_rate):.1f} GB/s median, {max(bf16_rate):.1f} max")
        for low, high in BINS:
            rounds = [i for i in range(args.rounds) if low <= bf16_rate[i] < high]
            if not rounds:
                continue
            line = f"  bfloat16 at {low}{f'-{high}' if high != float('inf') else '+'} GB/s, {len(rounds)} rounds:"
            for name in libraries:
                share = statistics.median(rate[name][i] / bf16_rate[i] for i in rounds)
                line += f"  {name} {statistics.median(rate[name][i] for i in rounds):.1f} GB/s = {share:.3f} of bfloat16's"
            if args.against:
                speedup = statistics.median(rate["this tree"][i] / rate[args.against][i] for i in rounds)
                line += f"; this tree {speedup:.3f}x {args.against}"
            print(line)


if __name__ == "__main__":
    main()
