"""lmtool bench MODEL | --preset NAME | --config FILE"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..choices import BENCH_PRESETS
from ..errors import LmtoolError
from . import app
from .common import DTYPE_METAVAR, choice_parser, device_option, err, info, out, out_json, parse_dtype_list, progress


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got '{text}'", param_hint=option) from None
    if not values or min(values) < 1:
        raise typer.BadParameter("values must be positive integers", param_hint=option)
    return values


def model_folder(
    model: str | None, preset: str | None, config: Path | None, random_weights: bool, checkpoint_dtype: str,
    cache_dir: Path | None, force: bool = False,
) -> tuple[Path, str]:
    """(standard folder to benchmark, its name in the report); random checkpoints are written once."""
    from ..bench import config_name, model_config, preset_config, random_checkpoint, read_config_file
    from ..hub import resolve
    from ..loading import family_of

    given = [x for x in (model, preset, config) if x is not None]
    if len(given) != 1:
        raise LmtoolError("give one of MODEL, --preset NAME or --config FILE")
    if model is not None and not random_weights:
        return resolve(model, check_config=family_of).path, model
    if preset is not None:
        name, values = preset, preset_config(preset)
    elif config is not None:
        values = read_config_file(config)
        name = config_name(values, config.stem if config.name != "config.json" else config.parent.name)
    else:
        values = model_config(model)
        name = config_name(values, Path(model).name or model.replace("/", "--"))
    with progress(f"writing random {name} weights", None, unit_bytes=True) as bar:
        folder = random_checkpoint(
            name, values, checkpoint_dtype, cache_dir, on_start=bar.set_total, on_tensor=lambda t: bar.advance(t.nbytes),
            on_write=lambda where, size: info(
                f"writing {size / 1e9:,.2f} GB of random {name} weights to {where} (once; later runs reuse them)"
            ),
            force=force,
        )
    return folder, f"{name} (random weights)"


def cell(summary: dict[str, float], unit: str) -> str:
    digits = 2 if summary["median"] < 100 else 0
    return f"{summary['median']:.{digits}f} [{summary['min']:.{digits}f}–{summary['max']:.{digits}f}]"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the result table: one row per dtype and metric."""
    runners = ["lmtool", *report["settings"]["against"]]
    header = ["dtype", "metric", *(f"{r}" for r in runners)]
    header += [f"lmtool / {p}" for p in report["settings"]["against"]]
    rows = []
    for result in report["results"]:
        arrow = "↑" if result["higher_is_better"] else "↓"
        label = f"{result['label']} ({result['unit']}) {arrow}"
        cells = [cell(result["runners"][r], result["unit"]) for r in runners]
        if "per_weight_bytes" in result:
            cells = [f"{c} = {result['per_weight_bytes'][r]:.2f}× weights" for c, r in zip(cells, runners)]
        if "share_of_bandwidth" in result:
            cells = [f"{c} = {result['share_of_bandwidth'][r]:.0%} of read bandwidth" for c, r in zip(cells, runners)]
        ratios = [f"{result['ratio'][p]:.2f}×" if result["ratio"].get(p) else "–" for p in report["settings"]["against"]]
        rows.append([result["dtype"], label, *cells, *ratios])
    return header, rows


def describe_setup(report: dict[str, Any]) -> str:
    p, s = report["provenance"], report["settings"]
    backends = ", ".join(sorted(set(p.get("lmtool_linear_backend", {}).values()))) or "n/a"
    bandwidth = p.get("memory_bandwidth_gbps")
    measured = (
        f"; memory read bandwidth {cell(bandwidth, 'GB/s')} GB/s (sum of a 1 GiB float32 tensor, best of 5, "
        f"after each of {len(bandwidth['samples'])} runs)"
        if bandwidth else ""
    )
    from ..bench import PROBED_BETWEEN_PARTS
    from ..inference import cpu_line

    if any(r.get("bandwidth_probed") == PROBED_BETWEEN_PARTS for r in report["results"]):
        measured += "; each run's share of read bandwidth against reads between the four parts of its batch-1 decode"

    cpu = f"; {cpu_line(p['cpu_runtime'])}" if p.get("cpu_runtime") else ""
    return (
        f"{report['model']['name']} on {p['device_name']} ({p['device']}, {p['threads']} threads, lmtool linear layers: {backends}{cpu}); "
        f"lmtool {p['lmtool']}, torch {p['torch']}, transformers {p['transformers'] or 'not installed'}; "
        f"median [min–max] of {s['repeat']} fresh processes per runner, alternating"
        f"{', after a warm-up run' if s['warmup'] else ''}; decode of {s['new_tokens']} tokens after a "
        f"32-token prompt; other processes used at most {p['max_foreign_cpu_percent']:.0f}% of the CPU during a run kept "
        f"({p['runs_discarded_as_busy']} busier runs re-run){measured}"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> None:
    header, rows = table_rows(report)
    if sys.stdout.isatty():
        table = Table(*header, title=describe_setup(report), title_justify="left")
        for row in rows:
            table.add_row(*row)
        Console(highlight=False).print(table)
    else:
        out(describe_setup(report) + "\n")
        out(markdown_table(header, rows))


@app.command("bench")
def bench_command(
    model: Optional[str] = typer.Argument(None, help="Local folder or Hub id; or use --preset / --config."),
    preset: Optional[str] = typer.Option(
        None, "--preset", parser=choice_parser(BENCH_PRESETS), metavar="NAME",
        help=f"Released shape with random weights: {', '.join(BENCH_PRESETS)}.",
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json of a shape to run with random weights."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights (MODEL's config.json only)."),
    dtype: str = typer.Option(
        "auto", "--dtype", parser=parse_dtype_list, metavar=DTYPE_METAVAR + ",...", help="dtypes to run, a comma list."
    ),
    prompt_len: str = typer.Option("512", "--prompt-len", help="Prefill lengths, comma list."),
    batch: str = typer.Option("1", "--batch", help="Decode batch sizes, comma list."),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="Tokens generated per decode run."),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Measured runs per runner and dtype."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One unmeasured run per runner first."),
    against: list[str] = typer.Option([], "--against", help="Also run this peer, alternating: transformers."),
    device: str = device_option("cpu", help="Where the runs happen."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's)."),
    max_foreign_cpu: float = typer.Option(
        20.0, "--max-foreign-cpu", min=0, help="Re-run (twice at most) a run during which other processes used more than this % of the CPU; 100 = never."
    ),
    bandwidth: bool = typer.Option(
        True, "--bandwidth/--no-bandwidth", help="Measure the memory read rate around each run's batch-1 decode and after each run (cpu; about 1 s each)."
    ),
    checkpoint_dtype: str = typer.Option("bfloat16", "--checkpoint-dtype", help="dtype of random weights on disk."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where random checkpoints are kept."),
    force: bool = typer.Option(False, "--force", help="Write random weights even when larger than this machine's memory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV, one row per dtype, metric and runner."),
) -> None:
    """Measure load, time to first token, prefill and decode speed, and peak memory."""
    from ..bench import RETRIES, BenchSpec, busy_runs, check_runnable, csv_rows, run_bench

    if as_json and as_csv:
        raise LmtoolError("give --json or --csv, not both")
    against = list(dict.fromkeys(against))
    if (preset or config) and model is None:
        random_weights = True
    spec = BenchSpec(
        folder=Path(),
        name="",
        dtypes=[d.strip() for d in dtype.split(",") if d.strip()],
        prompt_lens=int_list(prompt_len, "--prompt-len"),
        batches=int_list(batch, "--batch"),
        repeat=repeat,
        warmup=warmup,
        new_tokens=new_tokens,
        against=against,
        device=device,
        threads=threads,
        max_foreign_cpu=max_foreign_cpu,
        bandwidth=bandwidth,
    )
    check_runnable(spec)  # before anything is written or run
    spec.folder, spec.name = model_folder(model, preset, config, random_weights, checkpoint_dtype, cache_dir, force)

    def on_run(runner: str, run_dtype: str, index: int, total: int) -> None:
        what = "warm-up" if index == 0 else f"run {index}/{total}"
        info(f"[dim]{what}: {runner} {run_dtype}[/dim]")

    report = run_bench(spec, on_run=on_run)
    busy = busy_runs(report)
    if busy:
        worst = max(r["foreign_cpu_percent"] for r in busy)
        err.print(
            f"warning: {len(busy)} run(s) kept after {RETRIES} re-runs although other processes took up "
            f"to {worst:.0f}% of the CPU (over --max-foreign-cpu {max_foreign_cpu:g}); their figures may be low",
            markup=False,
        )
    if as_json:
        out_json(report)
    elif as_csv:
        rows = csv_rows(report)
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        render(report)
