"""Peak memory of one prefill and a few batch-1 decode steps, above torch's own runtime, against
the weights' size: the memory a batch-1 run needs (bench's peak also holds a batch-8 decode state).

    python benchmarks/prefill_memory.py FOLDER [--prompt-len 512] [--dtype bfloat16]

FOLDER is any checkpoint lmtool loads (e.g. a `lmtool bench --preset` folder under
~/.cache/lmtool/bench). Run it alone: the figure is the process's peak resident set.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch_own = peak_gib()
    import lmtool

    lm = lmtool.load(args.folder, task="causal-lm", dtype=args.dtype, tokenizer=False)
    model = lm.model
    ids = torch.randint(10, lm.config.vocab_size, (1, args.prompt_len))
    with torch.inference_mode():
        cache = model.make_cache(1, args.prompt_len + 8)
        token = model(ids, cache=cache, logits_to_keep=1)[:, -1].max(-1, keepdim=True).indices
        for _ in range(4):
            token = model(token, cache=cache, logits_to_keep=1)[:, -1].max(-1, keepdim=True).indices
    weights = sum(p.stat().st_size for p in Path(args.folder).glob("*.safetensors")) / 2**30
    above = peak_gib() - torch_own
    print(f"weights {weights:.2f} GiB; torch's own {torch_own:.2f} GiB; peak above it {above:.2f} GiB "
          f"({above / weights:.2f}x the weights) after a {args.prompt_len}-token prefill and 4 decode steps")


if __name__ == "__main__":
    main()
