"""Items per second of a data-parallel run on torchrun, for 1, 2, ... ranks on this machine.

    python benchmarks/scale_out.py [--ranks 1,2,4] [--items 64] [--model M] [--command generate|tag|classify]

Each run is a fresh `torchrun --standalone --nproc-per-node R -m lmtool COMMAND MODEL ... -o OUT`
with --threads cores/R, timed from start to exit (model loading and rank start-up included, as a
user pays them), on a batch of ITEMS inputs written to a temporary folder. generate (the default,
on the demo model shipped with lmtool) runs --prompts-file with 16 new tokens a prompt; tag and
classify need a --model with that head and run --files-from. Prints one line per rank count:
ranks, seconds, items/s, speed-up over the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "lmtool" / "demo" / "zen-gemma"
LINES = [
    "Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
    "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
]


def write_inputs(folder: Path, command: str, items: int) -> list[str]:
    """The input options for `items` inputs of the command."""
    if command == "generate":
        path = folder / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": LINES[i % len(LINES)][:12]}) + "\n" for i in range(items)))
        return ["--prompts-file", str(path), "-n", "16", "--temperature", "0", "--ignore-eos"]
    paths = []
    for i in range(items):
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(LINES[(i + j) % len(LINES)] for j in range(1 + i % 8)))
        paths.append(str(path))
    listing = folder / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return ["--files-from", str(listing)]


def timed_run(ranks: int, command: str, model: str, inputs: list[str], output: Path, threads: int) -> float:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "lmtool", command, model, *inputs, "-o", str(output), "--force", "--threads", str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    run = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"{ranks} ranks failed:\n{run.stderr[-2000:]}")
    return seconds


def main() -> None:
    cores = os.cpu_count() or 1
    default_ranks = ",".join(str(r) for r in (1, 2, 4, 8) if r <= max(2, cores))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default=default_ranks, help=f"comma list of rank counts (default {default_ranks})")
    parser.add_argument("--items", type=int, default=64, help="inputs per run (default 64)")
    parser.add_argument("--command", default="generate", choices=("generate", "tag", "classify"))
    parser.add_argument("--model", default=str(DEMO), help="default: the demo model (generate only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        inputs = write_inputs(folder, args.command, args.items)
        first = None
        print(f"{args.command}, {args.items} items, {cores} cores")
        for ranks in (int(r) for r in args.ranks.split(",")):
            seconds = timed_run(ranks, args.command, args.model, inputs, folder / "out.jsonl", max(1, cores // ranks))
            rate = args.items / seconds
            first = first or rate
            print(f"{ranks} ranks: {seconds:.2f} s, {rate:.1f} items/s, x{rate / first:.2f}", flush=True)


if __name__ == "__main__":
    main()
