"""The float32 prefill product, F.linear (PyTorch's CPU sgemm, what transformers runs) against
lmtool.inference.prefill_linear (oneDNN's matmul on the plain weight), on the weight shapes of the
bench presets, alternating round by round (the host's speed drifts within minutes, so only
alternated numbers compare).

    python benchmarks/prefill_gemm.py [--rows 64 512] [--repeat 5]

Both sides take the bfloat16 checkpoint's weight widened to float32 in a reused buffer (what a
float32 model from a bfloat16 file does at prefill), so the ratio is the products' alone. Prints
GFLOP/s medians [min-max] and the ratio; the same script under ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 answers the question for AVX2 machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmtool.inference import onednn_float32_matmul, prefill_linear

# (in_features, out_features) of the larger projections of the presets
SHAPES = {
    "recurrentgemma-2b mlp up": (2560, 7680),
    "recurrentgemma-2b mlp down": (7680, 2560),
    "zamba2-1.2b in_proj": (2048, 8512),
    "gemma-2b mlp down": (16384, 2048),
}


def gflops(rows: int, k: int, n: int, seconds: float) -> float:
    return 2 * rows * k * n / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not onednn_float32_matmul():
        raise SystemExit("prefill_gemm.py: oneDNN's float32 matmul is not available in this torch build")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (k, n) in SHAPES.items():
        weight = torch.randn(n, k).bfloat16()
        wide = torch.empty(n, k)
        for rows in args.rows:
            x = torch.randn(rows, k)
            runners = {
                "F.linear": lambda: F.linear(x, wide.copy_(weight)),
                "prefill_linear": lambda: prefill_linear(x, wide.copy_(weight), None),
            }
            samples: dict[str, list[float]] = {label: [] for label in runners}
            for round_ in range(args.repeat + 1):
                order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
                for label in order:
                    start = time.perf_counter()
                    runners[label]()
                    if round_:  # the first round warms up both
                        samples[label].append(gflops(rows, k, n, time.perf_counter() - start))
            cells = [
                f"{label} {statistics.median(s):6.1f} [{min(s):.0f}-{max(s):.0f}]" for label, s in samples.items()
            ]
            ratio = statistics.median(samples["prefill_linear"]) / statistics.median(samples["F.linear"])
            print(f"{name:28s} rows {rows:4d}: {' | '.join(cells)} GFLOP/s  ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
