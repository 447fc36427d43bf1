"""Batch-1 decode of a random Gemma-2B-shaped checkpoint in bfloat16, int8 and int4 (group 64),
each quantized by lmtool's own `quantize`: the speed ratios of issue #13 (int8 >= 1.7x and int4 >=
2.8x bfloat16 decode; prefill >= 0.9x) and a run's peak memory against the checkpoint's bytes.

    python benchmarks/quant_decode.py [--preset gemma-2b] [--repeat 5] [--tokens 32]
                                      [--prompt-len 128] [--alternating-rounds 11] [--json report.json]

The bfloat16 checkpoint is `lmtool bench`'s (~/.cache/lmtool/bench/<preset>-bfloat16, written once);
its int8 and int4 quantizations are written once beside it (<preset>-int8, <preset>-int4-g64, no
verification: random weights have nothing to verify). Each round runs the three models one after
the other, each in a fresh process (so its peak memory above torch's own is its own: the load's
copies plus the mapped pages the run touched), and the rounds repeat:
medians and min-max ranges over the rounds, ratios against bfloat16 within each round. Each run
times its prefill after one untimed prefill of the same length (lmtool bench's warm-up). The
decode and prefill speeds and ratios come from one more process that loads the three models and
times them interleaved, `--alternating-rounds` rounds of one prefill of each and then `--tokens`
decode steps of each, one step of each in turn (per round each model's prefill and median step;
ratios within a round): on a host whose read rate moves within seconds, the fresh processes'
decode ratios (column "x bf16 (fresh)") moved by half from round to round, and their prefill
ratios ("prefill (fresh)") by a third from run to run. Decode
GB/s is the bytes a step streams (lmtool.bench.streamed_bytes: codes, scales and zero points for
the quantized models) times the tokens per second; the machine's read bandwidth is measured once
for comparison. Run it on a quiet machine: the figures are only as good as the CPU is idle.
`--layers N` shrinks the model (a quick check that the script works, no meaningful speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"bf16": None, "int8": ("int8", 64), "int4": ("int4", 64)}


def peak_gib() -> float:
    """This process's peak resident set (file pages included). VmHWM, not getrusage's ru_maxrss:
    a child inherits that from its parent across fork and exec (the parent's 1 GiB bandwidth
    buffer would hide every worker's own peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def greedy(logits):
    """The next token as `lmtool generate` picks it at temperature 0 (lmtool.generation.sample: the
    max's index; bfloat16's argmax over Gemma's 256000 logits took 0.9 ms of each step, 5x the max's
    0.17, a cost the product does not pay and one that weighed on the quantized models' ratios)."""
    from lmtool.generation import SamplingParams, sample

    return sample(logits[:, -1], SamplingParams(temperature=0.0), None).unsqueeze(-1)


def worker(folder: str, prompt_len: int, tokens: int) -> None:
    """One model in this process: load, prefill, decode; a JSON line on stdout."""
    import torch

    torch_own = peak_gib()
    import lmtool
    from lmtool import kernels

    started = time.perf_counter()
    lm = lmtool.load(folder, task="causal-lm", dtype="bfloat16", tokenizer=False)
    load_s = time.perf_counter() - started
    model = lm.model
    ids = torch.randint(10, lm.config.vocab_size, (1, prompt_len))
    warmup = 3
    with torch.inference_mode():
        model(ids[:, :8], cache=model.make_cache(1, 16), logits_to_keep=1)  # first-call costs (kernel build, pages)
        # the prompt's shape once untimed, as lmtool bench does (llama-bench's warm-up): the first
        # product of each shape creates its oneDNN primitive, and the tiled prefill has shapes of
        # its own; timed cold, int4's prefill ran 0.73-1.00x bfloat16 from round to round
        model(ids, cache=model.make_cache(1, prompt_len), logits_to_keep=1)
        cache = model.make_cache(1, prompt_len + warmup + tokens + 1)
        started = time.perf_counter()
        token = greedy(model(ids, cache=cache, logits_to_keep=1))
        prefill_s = time.perf_counter() - started
        steps = []
        for _ in range(warmup + tokens):
            started = time.perf_counter()
            token = greedy(model(token, cache=cache, logits_to_keep=1))
            steps.append(time.perf_counter() - started)
    print(json.dumps({
        # the whole run's peak above torch's own: the load's copies, the mapped pages decode touched
        "load_s": load_s, "peak_gib": peak_gib() - torch_own, "prefill_s": prefill_s,
        "decode_step_s": statistics.median(steps[warmup:]), "kernels": kernels.describe()["kernels"],
    }))


def alternating_worker(folders: list[str], rounds: int, tokens: int, prompt_len: int) -> None:
    """All the models in this one process, timed in turn: each round one prefill of `prompt_len`
    tokens of each model (a fresh cache each, the order reversed every other round), then `tokens`
    batch-1 decode steps of each, one step of each model after another (the order reversed every
    other step): so the models of a round meet the machine in the same states (a host whose read
    rate moves within seconds moved the separate runs' decode ratios by half, and their prefill
    ratios by a third: 0.79-1.07x int4 capped to AVX2 in runs minutes apart, where in one process
    they stayed within 0.93-1.02x). A JSON line on stdout: each model's prefill and median step per
    round."""
    import torch

    import lmtool

    models = [lmtool.load(folder, task="causal-lm", dtype="bfloat16", tokenizer=False).model for folder in folders]
    steps: list[list[float]] = [[] for _ in models]
    prefills: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        prompt = torch.randint(10, 1000, (1, prompt_len))
        for model in models:  # untimed: first-call costs and each prefill shape's oneDNN primitives
            model(prompt, cache=model.make_cache(1, prompt_len), logits_to_keep=1)
        ids = torch.randint(10, 1000, (1, 16))
        caches = [model.make_cache(1, 16 + rounds * (tokens + 2) + 8) for model in models]
        tokens_now = []
        for model, cache in zip(models, caches):
            token = greedy(model(ids, cache=cache, logits_to_keep=1))
            tokens_now.append(greedy(model(token, cache=cache, logits_to_keep=1)))
        for round_ in range(rounds):
            for i in range(len(models)) if round_ % 2 == 0 else reversed(range(len(models))):
                started = time.perf_counter()
                models[i](prompt, cache=models[i].make_cache(1, prompt_len), logits_to_keep=1)
                prefills[i].append(time.perf_counter() - started)
            times: list[list[float]] = [[] for _ in models]
            for step in range(tokens):
                for i in range(len(models)) if step % 2 == 0 else reversed(range(len(models))):
                    started = time.perf_counter()
                    tokens_now[i] = greedy(models[i](tokens_now[i], cache=caches[i], logits_to_keep=1))
                    times[i].append(time.perf_counter() - started)
            for i, model_times in enumerate(times):
                steps[i].append(statistics.median(model_times))
    print(json.dumps({"step_s": steps, "prefill_s": prefills}))


def checkpoints(preset: str, layers: int | None) -> dict[str, Path]:
    """The bfloat16 checkpoint and its quantizations, written where missing."""
    from lmtool.bench import cache_root, preset_config, random_checkpoint
    from lmtool.quantize.build import Recipe, quantize

    values = preset_config(preset)
    name = preset
    if layers:
        values["num_hidden_layers"] = layers
        name = f"{preset}-{layers}layers"
    source = random_checkpoint(name, values, "bfloat16")
    folders = {"bf16": source}
    for variant, recipe in VARIANTS.items():
        if recipe is None:
            continue
        scheme, group = recipe
        out = cache_root() / (f"{name}-{scheme}" + (f"-g{group}" if scheme == "int4" else ""))
        if not (out / "config.json").is_file():
            print(f"quantizing {source.name} to {out.name} ...", file=sys.stderr)
            quantize(str(source), out, Recipe(scheme=scheme, group_size=group), verify=False, force=True)
        folders[variant] = out
    return folders


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma-2b")
    parser.add_argument("--layers", type=int, help="fewer layers: a quick check of the script, not a measurement")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of bf16, int8, int4 (default 5)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per run (default 32)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prefill length (default 128)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--alternating-rounds", type=int, default=11,
                        help="rounds of the decode steps of the three models alternating in one process (default 11)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--alternating-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.prompt_len, args.tokens)
        return
    if args.alternating_worker:
        alternating_worker(args.alternating_worker, args.alternating_rounds, args.tokens, args.prompt_len)
        return

    from lmtool.bench import memory_read_bandwidth, streamed_bytes

    folders = checkpoints(args.preset, args.layers)
    streamed = {v: streamed_bytes(f, "bfloat16", "native") for v, f in folders.items()}
    stored = {v: sum(p.stat().st_size for p in f.glob("*.safetensors")) for v, f in folders.items()}
    bandwidth = memory_read_bandwidth()
    runs: dict[str, list[dict]] = {v: [] for v in folders}
    for round_ in range(args.repeat):
        for variant, folder in folders.items():
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(folder), "--tokens", str(args.tokens),
                 "--prompt-len", str(args.prompt_len)],
                capture_output=True, text=True, check=True,
            )
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant].append(run)
            print(f"round {round_ + 1}/{args.repeat} {variant}: {1 / run['decode_step_s']:.2f} tok/s, "
                  f"prefill {run['prefill_s']:.2f} s", file=sys.stderr)

    print(f"prefills and decode steps of the three models alternating in one process, {args.alternating_rounds} rounds",
          file=sys.stderr)
    done = subprocess.run(
        [sys.executable, __file__, "--tokens", str(args.tokens), "--alternating-rounds", str(args.alternating_rounds),
         "--prompt-len", str(args.prompt_len), "--alternating-worker", *map(str, folders.values())],
        capture_output=True, text=True, check=True,
    )
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    alternating = dict(zip(folders, timed["step_s"]))
    alternating_prefill = dict(zip(folders, timed["prefill_s"]))

    report = {"preset": args.preset, "layers": args.layers, "tokens": args.tokens, "prompt_len": args.prompt_len,
              "repeat": args.repeat, "alternating_rounds": args.alternating_rounds, "read_bandwidth_gbs": bandwidth,
              "kernels": runs["bf16"][0]["kernels"], "variants": {}}
    print(f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, kernels {report['kernels']}, "
          f"machine read bandwidth {bandwidth:.1f} GB/s; decode and prefill alternating in one process "
          f"({args.alternating_rounds} rounds), \"fresh\" and peak {args.repeat} rounds of fresh processes")
    print(f"{'':6} {'tok/s':>20} {'x bf16':>20} {'GB/s':>7} {'x bf16 (fresh)':>20} {'prefill x bf16':>20} "
          f"{'prefill (fresh)':>20} {'peak / bytes':>13}")
    for variant in folders:
        tok_s = [1 / step for step in alternating[variant]]
        ratios = [b / step for b, step in zip(alternating["bf16"], alternating[variant])]
        fresh = [b["decode_step_s"] / r["decode_step_s"] for b, r in zip(runs["bf16"], runs[variant])]
        prefill = [b / r for b, r in zip(alternating_prefill["bf16"], alternating_prefill[variant])]
        fresh_prefill = [b["prefill_s"] / r["prefill_s"] for b, r in zip(runs["bf16"], runs[variant])]
        peak = [r["peak_gib"] * 2**30 / stored[variant] for r in runs[variant]]
        entry = {
            "folder": str(folders[variant]), "stored_bytes": stored[variant], "streamed_bytes": streamed[variant],
            "tok_s": spread(tok_s), "decode_x_bf16": spread(ratios), "fresh_decode_x_bf16": spread(fresh),
            "prefill_x_bf16": spread(prefill), "fresh_prefill_x_bf16": spread(fresh_prefill), "decode_gbs": statistics.median(tok_s) * streamed[variant] / 1e9,
            "peak_over_bytes": spread(peak), "alternating_step_s": alternating[variant],
            "alternating_prefill_s": alternating_prefill[variant], "runs": runs[variant],
        }
        report["variants"][variant] = entry

        def cell(s: dict[str, float], fmt: str) -> str:
            return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

        print(f"{variant:6} {cell(entry['tok_s'], '.2f'):>20} {cell(entry['decode_x_bf16'], '.2f'):>20} "
              f"{entry['decode_gbs']:7.1f} {cell(entry['fresh_decode_x_bf16'], '.2f'):>20} "
              f"{cell(entry['prefill_x_bf16'], '.2f'):>20} {cell(entry['fresh_prefill_x_bf16'], '.2f'):>20} "
              f"{statistics.median(peak):13.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
