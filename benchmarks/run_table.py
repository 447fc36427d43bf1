"""Reproduce the README's speed tables: lmtool against transformers on Gemma-2B, BLOOM-560m,
RecurrentGemma-2B and Zamba2-1.2B.

From the repository root, with lmtool and transformers installed:

    python benchmarks/run_table.py                   # both presets, 3 repeats: about 25 min on 2 cores
    python benchmarks/run_table.py --repeat 5        # the README's table: about 40 min
    python benchmarks/run_table.py --repeat 5 --presets bloom-560m
    python benchmarks/run_table.py --repeat 3 --presets recurrentgemma-2b   # about 20 min
    python benchmarks/run_table.py --repeat 3 --presets zamba2-1.2b --dtypes bfloat16
    python benchmarks/run_table.py --render-only     # re-print the table from the saved reports
    python benchmarks/run_table.py --isa avx2 --presets gemma-2b,bloom-560m --dtypes bfloat16

--isa avx2 runs both sides as a CPU without AVX-512 would (LMTOOL_ISA=avx2, and for PyTorch, oneDNN
and so transformers ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2): the AVX2 table of the CPU
speed issue on an AVX-512 machine, kept as benchmarks/results/P-avx2.json. It caps instruction sets;
it cannot make the memory system or the cores those of an AVX2 machine.

For each preset it runs

    lmtool bench --preset P --dtype bfloat16,float32 --prompt-len 512 --batch 1,8 \
                 --against transformers --repeat R --json

(random weights in bfloat16, written once to the bench cache; every run a fresh process, the two
runners alternating), keeps the JSON report in benchmarks/results/P.json, and prints the markdown
table with the targets of the speed issue checked. Needs about 16 GB of free RAM for transformers'
float32 Gemma run; run it on an otherwise idle machine (the report says how busy it was).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
PRESETS = ["gemma-2b", "bloom-560m", "recurrentgemma-2b", "zamba2-1.2b"]
# Presets whose issue counts peak memory above torch's own runtime (the others: the whole process).
RSS_ABOVE_TORCH = ("recurrentgemma", "zamba2")
METRIC_ORDER = ["decode@1", "decode_gbps@1", "decode@8", "prefill@512", "ttft_s", "load_s", "peak_rss", "model_rss"]


# What a run capped below native bfloat16 (--isa avx2) puts in the environment of both runners.
WITHOUT_AVX512 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def target(preset: str, dtype: str, key: str, native_bf16: bool = True) -> tuple[str, str, float] | None:
    """(what is compared, direction, bound) of the issue's target for this row, if it has one.
    native_bf16: the CPU (or the run's cap) has bfloat16 matmul; without it the CPU speed issue
    asks for less at batch 1 (transformers reads the weights faster there) and more at prefill
    (transformers' bfloat16 prefill is emulated)."""
    zamba2 = preset.startswith("zamba2")
    if key == "decode@1":
        if not native_bf16 and dtype == "bfloat16":
            return "ratio", ">=", 1.6
        return "ratio", ">=", 2.5 if preset.startswith("bloom") else 2.0
    if key == "decode_gbps@1" and preset.startswith(("gemma", "bloom")) and dtype == "bfloat16":
        return "bandwidth", ">=", 0.85
    if key == "decode@8":
        return "ratio", ">=", 3.0 if zamba2 else 1.5
    if key == "prefill@512":
        if not native_bf16 and dtype == "bfloat16":
            return "ratio", ">=", 2.0
        return "ratio", ">=", 1.5 if zamba2 else 1.0
    if key == "ttft_s":
        return "ratio", "<=", 0.5
    if key == "load_s" and dtype == "float32":
        return "ratio", "<=", 0.5
    if key == "peak_rss" and not preset.startswith(RSS_ABOVE_TORCH):
        return "weights", "<=", 1.1
    if key == "model_rss" and preset.startswith(RSS_ABOVE_TORCH):
        return "weights", "<=", 1.1
    return None


def report_path(preset: str, isa: str | None) -> Path:
    return RESULTS / (f"{preset}-{isa}.json" if isa else f"{preset}.json")


def run(preset: str, repeat: int, dtypes: str, isa: str | None) -> dict:
    command = [
        sys.executable, "-m", "lmtool", "bench", "--preset", preset, "--dtype", dtypes,
        "--prompt-len", "512", "--batch", "1,8", "--against", "transformers", "--repeat", str(repeat), "--json",
    ]
    env = dict(os.environ)
    if isa:
        env["LMTOOL_ISA"] = isa
        if isa not in ("avx512", "neon-bf16"):
            env.update(WITHOUT_AVX512)
    caps = " ".join(f"{k}={v}" for k, v in env.items() if k == "LMTOOL_ISA" or k in WITHOUT_AVX512)
    print(f"$ {caps + ' ' if caps else ''}lmtool " + " ".join(command[3:]), file=sys.stderr)
    done = subprocess.run(command, check=True, capture_output=False, stdout=subprocess.PIPE, env=env)
    report = json.loads(done.stdout)
    RESULTS.mkdir(exist_ok=True)
    report_path(preset, isa).write_text(json.dumps(report, indent=1) + "\n")
    return report


def number(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def spread(summary: dict) -> str:
    return f"{number(summary['median'])} [{number(summary['min'])}–{number(summary['max'])}]"


def rows_of(preset: str, report: dict) -> list[list[str]]:
    results = sorted(report["results"], key=lambda r: (r["dtype"], METRIC_ORDER.index(r["key"])))
    rows = []
    for r in results:
        lm, hf = r["runners"]["lmtool"], r["runners"]["transformers"]
        ratio = r["ratio"]["transformers"]
        lm_cell, hf_cell = spread(lm), spread(hf)
        if "per_weight_bytes" in r:
            lm_cell += f" ({r['per_weight_bytes']['lmtool']:.2f}× weights)"
            hf_cell += f" ({r['per_weight_bytes']['transformers']:.2f}× weights)"
        if "share_of_bandwidth" in r:  # reports from before the bandwidth probe lack it
            lm_cell += f" ({r['share_of_bandwidth']['lmtool']:.0%} of read bandwidth)"
            hf_cell += f" ({r['share_of_bandwidth']['transformers']:.0%} of read bandwidth)"
        native_bf16 = report["provenance"].get("cpu_runtime", {}).get("native_bf16_matmul", True)
        goal = target(preset, r["dtype"], r["key"], native_bf16)
        verdict = ""
        if goal:
            what, direction, bound = goal
            if what == "bandwidth":
                value, unit = r.get("share_of_bandwidth", {}).get("lmtool", 0.0), " of read bandwidth"
            elif what == "ratio":
                value, unit = ratio, "×"
            else:
                value, unit = r["per_weight_bytes"]["lmtool"], "× weights"
            met = value >= bound if direction == ">=" else value <= bound
            verdict = f"{'✅' if met else '❌'} {direction} {bound:.0%}{unit}" if what == "bandwidth" else (
                f"{'✅' if met else '❌'} {direction} {bound}{unit}"
            )
        arrow = "↑" if r["higher_is_better"] else "↓"
        rows.append([preset, r["dtype"], f"{r['label']} ({r['unit']}) {arrow}", lm_cell, hf_cell, f"{ratio:.2f}×", verdict])
    return rows


def cpu_line(report: dict) -> str:
    """The CPU's features and what this run used of them (kernels, any cap, bfloat16 prefill)."""
    runtime = report["provenance"].get("cpu_runtime")
    if not runtime:
        return ""
    cap = f" capped by LMTOOL_ISA={runtime['isa_cap']}" if runtime.get("isa_cap") else ""
    return (
        f"CPU features {' '.join(runtime['cpu_features'])}; kernels {runtime['kernels']}{cap}; "
        f"native bfloat16 matmul {'yes' if runtime['native_bf16_matmul'] else 'no'}; "
        f"bfloat16 prefill in {runtime['bfloat16_prefill']}; "
    )


def machine(report: dict) -> str:
    p = report["provenance"]
    return (
        f"{p['cpu']}, {p['cpu_count']} cores, {p['memory_gib']} GiB RAM, {p['threads']} torch threads; {cpu_line(report)}"
        f"{p['platform']}; Python {p['python']}, torch {p['torch']}, transformers {p['transformers']}, "
        f"lmtool {p['lmtool']}; {p['date']}; other processes used at most {p['max_foreign_cpu_percent']:.0f}% "
        f"of the CPU during a run kept ({p.get('runs_discarded_as_busy', 0)} busier runs were re-run)"
    )


def bandwidth(reports: dict[str, dict]) -> str:
    """The memory read rate probed around each run's batch-1 decode (the shares' roofs), else the
    one measured after each run, if it was."""
    from lmtool.bench import PROBED_BETWEEN_PARTS

    around, after = [], []
    for preset, r in reports.items():
        rows = [row for row in r["results"] if row["key"] == "decode_gbps@1" and "memory_bandwidth_gbps" in row]
        if rows and rows[0].get("bandwidth_probed") == PROBED_BETWEEN_PARTS:
            around += [f"{spread(row['memory_bandwidth_gbps'])} GB/s during {preset} {row['dtype']}" for row in rows]
        elif r["provenance"].get("memory_bandwidth_gbps"):
            after.append(f"{spread(r['provenance']['memory_bandwidth_gbps'])} GB/s during {preset}")
    text = ""
    if around:
        text += ("; memory read rate (two sums of a 256 MiB float32 tensor before each quarter of a run's batch-1 "
                 "decode and after the last, all bytes over all time: the roof of that run's share) " + ", ".join(around))
    if after:
        text += "; memory read bandwidth (sum of a 1 GiB float32 tensor after each run) " + ", ".join(after)
    return text


def render(reports: dict[str, dict]) -> str:
    header = ["model", "dtype", "metric", "lmtool", "transformers", "lmtool ÷ transformers", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for preset, report in reports.items():
        lines += ["| " + " | ".join(row) + " |" for row in rows_of(preset, report)]
    first = next(iter(reports.values()))
    s = first["settings"]
    runs = {preset: r["provenance"]["date"] for preset, r in reports.items()}
    when = "" if len(set(runs.values())) == 1 else "; runs: " + ", ".join(f"{p} {d}" for p, d in runs.items())
    notes = [
        "",
        f"Machine: {machine(first)}{bandwidth(reports)}{when}.",
        f"Median [min–max] of {s['repeat']} fresh processes per runner and dtype, lmtool and transformers "
        "alternating, each after one unmeasured warm-up run; random weights stored in bfloat16 (float32 rows "
        f"load the same bfloat16 files). Decode: {s['new_tokens']} tokens after a 32-token prompt, prefill "
        "excluded; time to first token: from process start (import, load, 32-token prompt).",
    ]
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--isa", help="Cap the instruction set of both runners (avx2: as a CPU without AVX-512).")
    parser.add_argument("--render-only", action="store_true", help="Print the table from benchmarks/results/.")
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    if args.render_only:
        reports = {p: json.loads(report_path(p, args.isa).read_text()) for p in presets}
    else:
        reports = {p: run(p, args.repeat, args.dtypes, args.isa) for p in presets}
    print(render(reports))


if __name__ == "__main__":
    main()
