"""Where a decode step's time goes: the torch operations of a few cached one-token steps, by self
CPU time, and the step's wall time next to the time its weights take to stream at the machine's
read bandwidth.

    python benchmarks/profile_decode.py FOLDER [--dtype bfloat16] [--batch 1] [--steps 8] [--top 25]

FOLDER is any checkpoint lmtool loads (e.g. a `lmtool bench --preset` folder under
~/.cache/lmtool/bench). Use it to find the small operations around the kernels that cost more than
their share; quote speed from `lmtool bench`, not from here (the profiler adds its own overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lmtool
from lmtool.bench import memory_read_bandwidth, streamed_bytes
from lmtool.inference import backend_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    lm = lmtool.load(args.folder, task="causal-lm", dtype=args.dtype, tokenizer=False)
    model = lm.model
    ids = torch.randint(10, lm.config.vocab_size, (args.batch, args.prompt_len))
    cache = model.make_cache(args.batch, args.prompt_len + 2 * args.steps + 4)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        # max, not argmax: what generate does for greedy (bfloat16 argmax is several times slower)
        return model(tokens, cache=cache, logits_to_keep=1)[:, -1].max(-1, keepdim=True).indices

    with torch.inference_mode():
        token = model(ids, cache=cache, logits_to_keep=1)[:, -1].max(-1, keepdim=True).indices
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            token = step(token)
            times.append(time.perf_counter() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                token = step(token)

    backend = backend_for(lm.dtype, lm.device) or "nn.Linear"
    weights = streamed_bytes(Path(args.folder), args.dtype, backend)
    bandwidth = memory_read_bandwidth()  # GB/s
    median = statistics.median(times)
    floor = weights / (bandwidth * 1e9)
    print(f"backend {backend}; step median {median * 1e3:.1f} ms at batch {args.batch}; weights {weights / 1e9:.2f} GB "
          f"stream in {floor * 1e3:.1f} ms at {bandwidth:.1f} GB/s ({floor / median:.0%} of the step)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
