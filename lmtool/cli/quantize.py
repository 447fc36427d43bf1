"""lmtool quantize MODEL OUT --scheme int8|int4|int4-m"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ExitCode
from . import app
from .common import err, info, out_json, progress, settings
from .common import out as print_result
from .inspect import _size


@app.command("quantize")
def quantize_command(
    model: str = typer.Argument(..., help="A model folder or Hub id (any family lmtool runs)."),
    out: Path = typer.Argument(..., help="Output folder (compressed-tensors layout)."),
    scheme: str = typer.Option(..., "--scheme", help="int8 (per row), int4 (per group) or int4-m (int4, value/down projections int8)."),
    group_size: int = typer.Option(64, "--group-size", help="int4 group size: 32, 64 or 128."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Regex over module names to keep unquantized."),
    head: str = typer.Option("int8", "--head", help="Input embedding / tied LM head: int8 or bf16 (kept as is)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Text to verify on (default: a shipped public-domain text)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip running the source and quantized models."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Gate: highest mean KL divergence (int8 0.01, int4 0.1)."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Gate: lowest same-top-1 share in % (int8 95, int4 85)."),
    no_clip_search: bool = typer.Option(False, "--no-clip-search", help="int4: plain min/max ranges (faster, noisier)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary and report as JSON."),
) -> None:
    """Quantize a model to int8 / int4 weights (compressed-tensors layout), verified against the source."""
    from ..quantize.build import Recipe, quantize

    recipe = Recipe(scheme, group_size, keep, head, clip_search=not no_clip_search)
    recipe.check()
    gates = None
    if max_kld is not None or min_top1 is not None:
        default_kld, default_top1 = recipe.gates
        gates = (default_kld if max_kld is None else max_kld, default_top1 if min_top1 is None else min_top1)
    with progress("quantizing", None, unit_bytes=True) as bar:
        summary = quantize(
            model, out, recipe, verify=not no_verify, eval_text=eval_text, gates=gates, force=force,
            on_start=bar.set_total, on_tensor=lambda t: bar.advance(t.nbytes), on_stage=info,
        )
    report = summary.get("verification")
    if as_json:
        out_json(summary)
    else:
        render(summary)
        print_result(summary["output"])
    if report is not None and not report["passed"]:
        if not settings.quiet:
            err.print(f"quantize: below the quality gates (mean KLD <= {report['gates']['max_kld_mean']}, "
                      f"same top-1 >= {report['gates']['min_same_top1_pct']}%); {summary['output']} is written")
        raise typer.Exit(ExitCode.QUALITY)


def render(summary: dict) -> None:
    """The summary and the verification table, on stderr."""
    snrs = sorted((t["snr_db"], name) for name, t in summary["tensors"].items())
    info(f"{summary['recipe']['scheme']}: {summary['quantized_tensors']} tensors quantized, "
         f"{summary['bits_per_weight']} bits per weight, {_size(summary['bytes'])} in {summary['seconds']} s")
    if snrs:
        info(f"  SNR: lowest {snrs[0][0]} dB ({snrs[0][1]}), median {snrs[len(snrs) // 2][0]} dB")
    report = summary.get("verification")
    if report is None:
        return
    kld, ppl, dp = report["kld"], report["ppl"], report["delta_p_pct"]
    info(f"  verified on {report['text']}: {report['positions']} positions in {report['chunks']} chunks")
    rows = [
        ("mean KLD", f"{kld['mean']:.6f} ± {kld['mean_err']}"),
        ("median / p99 / max KLD", f"{kld['median']:.6f} / {kld['p99']:.6f} / {kld['max']:.6f}"),
        ("same top-1", f"{report['same_top1_pct']:.2f} ± {report['same_top1_pct_err']} %"),
        ("mean / RMS Δp", f"{dp['mean']:+.3f} / {dp['rms']:.3f} %"),
        ("PPL(Q) / PPL(ref)", f"{ppl['ratio']:.5f} ± {ppl['ratio_err']:.5f} ({ppl['quantized']} / {ppl['reference']})"),
        ("gates", "passed" if report["passed"] else "FAILED"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        info(f"  {name:<{width}}  {value}")
