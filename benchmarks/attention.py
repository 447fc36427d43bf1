"""The decode step's one-query attention (lm_attend_one) alone, at a model's head shapes and a few
cache lengths: microseconds a call. With --against REV that revision's kernels run alternating with
this tree's in one process (the order swapped every round), and their outputs are compared bit for
bit.

From the repository root:

    python benchmarks/attention.py                      # Gemma-2B's heads: 8 on one KV head of 256
    python benchmarks/attention.py --against HEAD~1 --keys 145,1000,4000
    python benchmarks/attention.py --heads 16 --kv-heads 16 --head-dim 64 --dtype float32

Threads are torch's (--threads, default 2). Quote ratios against the revision measured in the same
run; absolute times move with the host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kernel_sweep import revision_sources  # benchmarks/, beside this script

from lmtool import kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keys", default="145,1000", help="cache lengths, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=40, help="rounds of 50 calls (>= 1)")
    parser.add_argument("--against", metavar="REV", help="also run the kernels of this git revision")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads or args.repeat < 1:
        parser.error("--heads must be a multiple of --kv-heads, and --repeat at least 1")
    torch.set_num_threads(args.threads)
    isa = kernels.active_isa()
    if isa is None:
        raise SystemExit("attention: no native kernels on this machine")
    libraries = {"this tree": kernels.library()}
    if args.against:
        libraries[args.against] = kernels.load_library(kernels.build(kernels.compiler(), isa, revision_sources(args.against, isa)))
    dtype = getattr(torch, args.dtype)
    B, H, KV, hd = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"{isa.name}, {args.threads} threads, {args.dtype}: batch {B}, {H} heads on {KV} KV heads of {hd}")
    torch.manual_seed(0)
    for S in (int(n) for n in args.keys.split(",")):
        q = torch.randn(B, H, hd).to(dtype)
        k, v = (torch.randn(B, KV, S, hd).to(dtype) for _ in range(2))
        scores = torch.empty(B * H * S)
        outputs = {name: torch.full((B, H, hd), float("nan"), dtype=dtype) for name in libraries}
        calls = {
            name: (lambda lib=lib, out=outputs[name]: lib.lm_attend_one(
                int(dtype == torch.bfloat16), q.data_ptr(), H * hd, hd, k.data_ptr(), v.data_ptr(), KV * S * hd,
                S * hd, B, H, KV, S, hd, hd**-0.5, None, 0, None, 0, out.data_ptr(), scores.data_ptr()))
            for name, lib in libraries.items()
        }
        times: dict[str, list[float]] = {name: [] for name in libraries}
        names = list(libraries)
        for round_ in range(args.repeat):
            for name in names if round_ % 2 == 0 else names[::-1]:
                call = calls[name]
                start = time.perf_counter()
                for _ in range(50):
                    call()
                times[name].append((time.perf_counter() - start) / 50 * 1e6)
        line = f"{S:6d} keys: " + ", ".join(f"{name} {statistics.median(t):.1f} us" for name, t in times.items())
        if args.against:
            ratios = [a / b for a, b in zip(times[args.against], times["this tree"])]
            same = torch.equal(outputs["this tree"], outputs[args.against])
            line += f"; {statistics.median(ratios):.2f}x faster, outputs {'identical' if same else 'DIFFER'}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
