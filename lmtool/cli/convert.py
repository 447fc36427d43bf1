"""lmtool convert SRC OUT"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..choices import CONVERT_FORMATS
from . import app
from .common import choice_parser, dtype_option, info, metavar, out_json, progress
from .common import out as print_result
from .inspect import _size


@app.command("convert")
def convert_command(
    src: Path = typer.Argument(..., help="An original checkpoint (file or folder), or a standard folder."),
    out: Optional[Path] = typer.Argument(None, help="Output folder (standard layout). Not needed with --dry-run."),
    from_format: Optional[str] = typer.Option(
        None, "--from", parser=choice_parser(CONVERT_FORMATS), metavar=metavar(CONVERT_FORMATS),
        help="Source format; detected when not given.",
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json with what the shapes cannot tell."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder, tokenizer.json or tokenizer.model."),
    dtype: str = dtype_option(help="Written dtype; auto keeps the checkpoint's."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="e.g. 5GB; default: one file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a checkpoint to the standard layout (config.json + safetensors + tokenizer)."""
    from ..checkpoint import parse_size
    from ..convert import ConvertOptions, convert
    from ..loading import resolve_dtype

    options = ConvertOptions(
        config_file=config,
        tokenizer=tokenizer,
        dtype=None if dtype == "auto" else resolve_dtype(dtype, None, None),
    )
    shard = parse_size(max_shard_size) if max_shard_size else None
    if not dry_run and out is None:
        raise typer.BadParameter("OUT is required unless --dry-run is given", param_hint="OUT")
    with progress("converting", None, unit_bytes=True) as bar:
        summary = convert(
            src, out, from_format, options, shard, dry_run=dry_run, force=force,
            on_start=bar.set_total, on_tensor=lambda t: bar.advance(t.nbytes),
        )
    if as_json:
        out_json(summary)
        return
    # The plan is the result of a dry run (stdout); after a real run it is a report (stderr).
    show = print_result if dry_run else info
    verb = "would write" if dry_run else "wrote"
    show(f"{summary['format']} -> {summary['family']} ({summary['architecture']}): "
         f"{summary['tensors']} tensors, {_size(summary['bytes'])}")
    for shard_info in summary["shards"]:
        show(f"  {verb} {shard_info['file']}: {shard_info['tensors']} tensors, {_size(shard_info['bytes'])}")
    for name in summary["files"]:
        show(f"  {verb} {name}")
    for note in summary["notes"]:
        show(f"  note: {note}")
    if not dry_run:
        print_result(summary["output"])
