"""lmtool inspect MODEL|FILE"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import out_json


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render(result: dict, console: Console, show_tensors: bool) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("source", "format", "family", "architecture", "task"):
        if key in result:
            table.add_row(key, str(result[key]))
    if "heads" in result:
        table.add_row("heads", ", ".join(result["heads"]) or "none (backbone only)")
        table.add_row("tied embeddings", "yes" if result["tied_embeddings"] else "no")
    for key, value in result.get("structure", {}).items():
        table.add_row(key, _size(value) if "state" in key and isinstance(value, int) else str(value))
    table.add_row("parameters", f"{_count(result['parameters'])} ({result['parameters']:,})")
    table.add_row("size", f"{_size(result['bytes'])} in {result['tensor_count']} tensors")
    table.add_row("dtypes", ", ".join(f"{k} {_size(v)}" for k, v in result["dtypes"].items()))
    tokenizer = result.get("tokenizer")
    if tokenizer:
        table.add_row(
            "tokenizer",
            f"{tokenizer['model']}, {tokenizer['vocab_size']:,} tokens, bos={tokenizer['bos']} "
            f"eos={tokenizer['eos']} pad={tokenizer['pad']}, add_bos={tokenizer['add_bos']}",
        )
    elif "tokenizer" in result:
        table.add_row("tokenizer", "none")
    quantization = result.get("quantization")
    if quantization:
        groups = ", ".join(f"{name} {g['tensors']} tensors {_size(g['bytes'])}" for name, g in quantization["groups"].items())
        table.add_row("quantization", f"{quantization['scheme']} ({quantization['method']}, {quantization['format']}), "
                      f"{quantization['bits_per_weight']} bits per quantized weight, "
                      f"{_count(quantization['parameters'])} parameters; {groups}")
    for note in result.get("notes", []):
        table.add_row("note", note)
    if "runtime" in result:
        from ..inference import runtime_lines

        for line in runtime_lines(result["runtime"]):
            table.add_row("runs here", line)
    console.print(table)
    if "config" in result:
        console.print("\n[bold]config[/bold]")
        console.print(json.dumps(result["config"], indent=2, sort_keys=True), markup=False, highlight=False)
    blocks = Table("block", "parameters", box=None)
    for name, count in result["blocks"].items():
        blocks.add_row(name, f"{count:,}")
    console.print()
    console.print(blocks)
    if show_tensors:
        tensors = Table("tensor", "shape", "dtype", box=None)
        for t in result["tensors"]:
            tensors.add_row(t["name"], str(t["shape"]), t["dtype"])
        console.print()
        console.print(tensors)


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument(..., help="Folder, .safetensors file, Hub id[@revision], or an original checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
) -> None:
    """Describe a checkpoint without loading its weights."""
    from ..inspect import inspect

    result = inspect(model, with_tensors=tensors)
    from ..inference import runtime

    result["runtime"] = runtime()  # what would run this model on this machine
    if as_json:
        out_json(result)
    else:
        render(result, Console(highlight=False, soft_wrap=True), tensors)
