"""lmtool classify | tag | qa MODEL [INPUT...]: task heads over one text or thousands of files."""

from __future__ import annotations

import sys
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..choices import AGGREGATIONS
from ..errors import ExitCode, Interrupted, LmtoolError
from ..settings import DEFAULT_MAX_LENGTH
from . import app
from .common import (
    choice_parser, device_option, dtype_option, info, metavar, open_lines, progress, threads_option,
)

INPUTS_HELP = "Texts, file paths, or '-' for stdin (an argument naming no file is text unless it looks like a path)."
MODEL_HELP = "Local folder, or a Hub id with optional @revision."
# Options every task command takes, in one place so the three stay alike.
FILES_FROM = typer.Option(None, "--files-from", help="A file with one input path a line; '-' is stdin.")
JSONL = typer.Option(None, "--jsonl", help="JSON Lines input: objects with \"id\" and \"text\"; '-' is stdin.")
LITERAL = typer.Option(False, "--text", help="Take every argument as text, never as a file.")
OUTPUT = typer.Option(None, "--output", "-o", help="Write the JSON Lines here instead of stdout.")
RESUME = typer.Option(False, "--resume", help="With --output: skip inputs whose results are already in it.")
FORCE = typer.Option(False, "--force", help="With --output: replace an existing file (without it, one is refused).")
AS_JSON = typer.Option(False, "--json", help="JSON Lines even when stdout is a terminal.")
BATCH_SIZE = typer.Option(16, "--batch-size", min=1, help="Model inputs per forward pass (sorted by length).")
MAX_LENGTH = typer.Option(DEFAULT_MAX_LENGTH, "--max-length", min=2, help="Tokens per window (capped by the model's).")
DTYPE = dtype_option()
DEVICE = device_option()
THREADS = threads_option()


def gather_items(inputs: list[str], files_from: str | None, jsonl: str | None, literal: bool,
                 text_fields: tuple[str, ...] = ("text",), given: list[Item] | None = None) -> list[Item]:
    """Items in the order given: `given` (qa's --context), arguments, --files-from, --jsonl; all of
    stdin as one text when there is none of them and stdin is not a terminal. Under torchrun,
    rank 0 gathers them (it alone reads stdin) and hands them to the other ranks."""
    from .. import distributed

    world = distributed.detect()
    if not world.distributed:
        return _gather_items(inputs, files_from, jsonl, literal, text_fields, given)
    distributed.start(world)
    uses_stdin = "-" in inputs or "-" in (files_from, jsonl) or any(i.path == "-" for i in given or [])
    distributed.stdin_check(world, uses_stdin or not (inputs or files_from or jsonl or given))
    return distributed.on_leader(world, lambda: [
        item.read_stdin_now() for item in _gather_items(inputs, files_from, jsonl, literal, text_fields, given)
    ])


def _gather_items(inputs: list[str], files_from: str | None, jsonl: str | None, literal: bool,
                  text_fields: tuple[str, ...], given: list[Item] | None) -> list[Item]:
    from ..tasks import Item
    from ..tasks import inputs as task_inputs

    stdin_uses = inputs.count("-") + (files_from == "-") + (jsonl == "-") + sum(i.path == "-" for i in given or [])
    if stdin_uses > 1:
        raise LmtoolError("stdin ('-') can feed only one input source")
    items = list(given or []) + task_inputs.from_arguments(inputs, literal)
    if files_from is not None:
        items += task_inputs.from_file_list(open_lines(files_from), files_from)
    if jsonl is not None:
        items += task_inputs.from_jsonl(open_lines(jsonl), jsonl, text_fields)
    if not items and not (files_from or jsonl):
        if sys.stdin.isatty():
            raise LmtoolError("no input: give texts or files, '-' for stdin, --files-from or --jsonl")
        items = [Item("-", path="-")]
    return items


def run_command(
    command: str, model: str, task_name: str, make_task: Callable, items: list[Item], render: Callable,
    *, output: str | None, resume: bool, as_json: bool, batch_size: int, dtype: str, device: str,
    force: bool = False, threads: int | None = None,
) -> None:
    from .. import distributed
    from ..loading import load, set_threads
    from ..tasks import run_task
    from ..tasks.records import JsonlWriter, resume_keys
    from ..tasks.windows import pad_id

    world = distributed.detect()
    distributed.require_output(world, output)
    if resume and output is None:
        raise LmtoolError("--resume needs --output FILE")
    # Under torchrun, or resuming what one left, OUT is written by lmtool.distributed.
    sharded = world.distributed or (resume and distributed.parts_dir(output).is_dir())
    distributed.check_output(world, output, resume=resume, force=force)
    lm = load(model, task=task_name, dtype=dtype, device=distributed.rank_device(world, device))
    world.log(f"{lm.device}, {set_threads(distributed.threads_for(world, threads), lm.weight_bytes)} threads")
    if lm.tokenizer is None:
        raise LmtoolError(f"{model}: has no tokenizer (tokenizer.json or tokenizer.model)")
    task = make_task(lm)
    if sharded:
        run_sharded(command, world, task, lm, items, output=output, resume=resume, force=force, batch_size=batch_size)
        return
    done = resume_keys(output) if resume else set()
    todo = [item for item in items if item.key_text not in done]
    table = output is None and not as_json and sys.stdout.isatty()
    records: list[dict] = []
    writer = None if table else JsonlWriter(output, append=resume)
    emitted = {"done": 0, "failed": 0}

    def emit(record: dict) -> None:
        records.append(record) if table else writer.write(record)
        emitted["failed" if "error" in record else "done"] += 1

    try:
        with progress(command, total=len(todo)) as bar:
            summary = run_task(
                task, todo, lm.model, pad_id=pad_id(lm.tokenizer), batch_size=batch_size,
                emit=emit, on_block=bar.advance,
            )
    except KeyboardInterrupt:
        # Typer would turn Ctrl-C into a bare exit code: say how far the run got and how to go on.
        kept = f"; they are in {output}: --resume continues" if output else ""
        raise Interrupted(
            f"{command}: interrupted after {emitted['done']} done, {emitted['failed']} failed "
            f"of {len(todo)}{kept}"
        ) from None
    finally:
        if writer is not None:
            writer.close()
    if table:
        render(records, Console(highlight=False, soft_wrap=True, markup=False))
    info(summary_line(command, summary, len(items) - len(todo), output))
    if summary.failed:
        raise typer.Exit(ExitCode.PARTIAL)


def summary_line(command: str, summary, skipped: int, output: str | None) -> str:
    already = f", {skipped} already in {escape(str(output))}" if skipped else ""
    errors = "".join(f", {n} {kind}" for kind, n in sorted(summary.errors.items()))
    return (
        f"[dim]{command}: {summary.done} done, {summary.failed} failed{errors}{already}; "
        f"{summary.tokens} tokens in {summary.seconds:.2f} s ({summary.tokens_per_second:.0f} tokens/s)[/dim]"
    )


def run_sharded(command: str, world, task, lm, items: list[Item], *, output: str, resume: bool, force: bool,
                batch_size: int) -> None:
    """The run under torchrun (or a resume of one): each rank its share, OUT merged in input order.
    Under torchrun it ends with exit 0 even when items failed: torchrun takes a non-zero exit for
    a crashed worker and would restart the whole group; the summary line and the error records tell."""
    from contextlib import nullcontext

    from .. import distributed
    from ..tasks import RunSummary, run_task
    from ..tasks.windows import pad_id

    def work(positions: list[int], write) -> RunSummary:
        order = iter(positions)
        with progress(command, total=len(positions)) if world.leader else nullcontext() as bar:
            summary = run_task(
                task, [items[p] for p in positions], lm.model, pad_id=pad_id(lm.tokenizer), batch_size=batch_size,
                emit=lambda record: write(next(order), record), on_block=bar.advance if bar else None,
            )
        world.log(f"{command}: {summary.done} done, {summary.failed} failed of this rank's {len(positions)}")
        return summary

    try:
        summaries, skipped = distributed.sharded_run(
            world, output, [item.key_text for item in items], resume=resume, force=force, work=work
        )
    except KeyboardInterrupt:
        raise Interrupted(f"{command}: interrupted; what was done is kept: --resume continues") from None
    summary = RunSummary.combined(summaries)
    if world.leader:
        info(summary_line(command, summary, skipped, output))
    if summary.failed and not world.distributed:
        raise typer.Exit(ExitCode.PARTIAL)


# --- tables for a terminal ------------------------------------------------------------------------


def _key(record: dict) -> str:
    return str(record.get("path", record.get("id", "")))


def _span(start, end) -> str:
    return "" if start is None else f"{start}-{end}"


def _score(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _table(console: Console, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(*columns, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _error_row(record: dict, width: int) -> list[str]:
    return [_key(record), f"error: {record['error']}"] + [""] * (width - 2)


def render_classes(records: list[dict], console: Console) -> None:
    rows = []
    for r in records:
        if "error" in r:
            rows.append(_error_row(r, 3))
            continue
        others = ", ".join(f"{x['label']} {_score(x['score'])}" for x in r["labels"][1:])
        rows.append([_key(r), f"{r['label'] or '(none)'} {_score(r['score'])}", others])
    _table(console, ["input", "label", "next"], rows)


def render_entities(records: list[dict], console: Console) -> None:
    rows = []
    for r in records:
        if "error" in r:
            rows.append(_error_row(r, 5))
        elif not r["entities"]:
            rows.append([_key(r), "(no entities)", "", "", ""])
        for e in r.get("entities", []):
            rows.append([_key(r), e["text"], e["label"], _score(e["score"]), _span(e["start"], e["end"])])
    _table(console, ["input", "entity", "label", "score", "chars"], rows)


def render_answers(records: list[dict], console: Console) -> None:
    rows = []
    for r in records:
        if "error" in r:
            rows.append(_error_row(r, 4))
            continue
        for a in r["answers"] or [r]:
            text = "(no answer)" if a["answer"] is None else a["answer"]
            rows.append([_key(r), text, _score(a["score"]), _span(a["start"], a["end"])])
    _table(console, ["input", "answer", "score", "chars"], rows)


# --- commands ----------------------------------------------------------------------------------


@app.command("classify")
def classify_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    inputs: Optional[list[str]] = typer.Argument(None, help=INPUTS_HELP),
    top_k: int = typer.Option(1, "--top-k", min=0, help="Labels per input, best first; 0 = all."),
    threshold: float = typer.Option(
        0.5, "--threshold", help="Multi-label models: report labels scoring at least this."
    ),
    files_from: Optional[str] = FILES_FROM,
    jsonl: Optional[str] = JSONL,
    literal: bool = LITERAL,
    output: Optional[str] = OUTPUT,
    resume: bool = RESUME,
    force: bool = FORCE,
    as_json: bool = AS_JSON,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    dtype: str = DTYPE,
    device: str = DEVICE,
    threads: Optional[int] = THREADS,
) -> None:
    """Label each input with a sequence-classification model (labels from its config's id2label)."""
    from ..tasks import Classify

    items = gather_items(inputs or [], files_from, jsonl, literal)
    run_command(
        "classify", model, "sequence-classification",
        lambda lm: Classify(lm, top_k=top_k or None, threshold=threshold, max_length=max_length),
        items, render_classes,
        output=output, resume=resume, as_json=as_json, batch_size=batch_size, dtype=dtype, device=device,
        force=force, threads=threads,
    )


@app.command("tag")
def tag_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    inputs: Optional[list[str]] = typer.Argument(None, help=INPUTS_HELP),
    aggregation: str = typer.Option(
        "simple", "--aggregation", parser=choice_parser(AGGREGATIONS), metavar=metavar(AGGREGATIONS),
        help="How tokens become entities (transformers' pipeline strategies).",
    ),
    stride: Optional[int] = typer.Option(
        None, "--stride", min=0, help="Tag inputs longer than the window in windows overlapping by this many tokens."
    ),
    ignore: list[str] = typer.Option(["O"], "--ignore", help="Labels not reported (repeatable)."),
    files_from: Optional[str] = FILES_FROM,
    jsonl: Optional[str] = JSONL,
    literal: bool = LITERAL,
    output: Optional[str] = OUTPUT,
    resume: bool = RESUME,
    force: bool = FORCE,
    as_json: bool = AS_JSON,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    dtype: str = DTYPE,
    device: str = DEVICE,
    threads: Optional[int] = THREADS,
) -> None:
    """Tag entities with a token-classification model: text, label, score and character offsets."""
    from ..tasks import Tagger

    items = gather_items(inputs or [], files_from, jsonl, literal)
    run_command(
        "tag", model, "token-classification",
        lambda lm: Tagger(lm, aggregation=aggregation, stride=stride, max_length=max_length, ignore=tuple(ignore)),
        items, render_entities,
        output=output, resume=resume, as_json=as_json, batch_size=batch_size, dtype=dtype, device=device,
        force=force, threads=threads,
    )


@app.command("qa")
def qa_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    inputs: Optional[list[str]] = typer.Argument(None, help="Contexts. " + INPUTS_HELP),
    question: Optional[str] = typer.Option(
        None, "--question", help="The question (for --jsonl: where an object has none)."
    ),
    context: Optional[str] = typer.Option(None, "--context", help="The context text."),
    context_file: Optional[str] = typer.Option(
        None, "--context-file", help="A file holding the context; '-' is stdin."
    ),
    top_k: int = typer.Option(1, "--top-k", min=1, help="Answers per question, best first."),
    max_answer_length: int = typer.Option(15, "--max-answer-length", min=1, help="Longest answer, in tokens."),
    doc_stride: int = typer.Option(128, "--doc-stride", min=0, help="Tokens shared by consecutive context windows."),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="Answer 'no answer' when the null span scores best."),
    files_from: Optional[str] = FILES_FROM,
    jsonl: Optional[str] = typer.Option(
        None, "--jsonl", help="JSON Lines input: objects with \"id\", \"question\" and \"context\"; '-' is stdin."
    ),
    literal: bool = LITERAL,
    output: Optional[str] = OUTPUT,
    resume: bool = RESUME,
    force: bool = FORCE,
    as_json: bool = AS_JSON,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    dtype: str = DTYPE,
    device: str = DEVICE,
    threads: Optional[int] = THREADS,
) -> None:
    """Answer a question from a context with an extractive question-answering model."""
    from ..tasks import Answerer, Item

    given = [Item("context", text=context)] if context is not None else []
    if context_file is not None:
        given.append(Item(context_file, key_field="path", path=context_file))
    items = gather_items(inputs or [], files_from, jsonl, literal, ("context", "text"), given)
    if question is None and jsonl is None:
        raise LmtoolError("give --question (or \"question\" fields with --jsonl)")
    if question is not None:
        from ..tasks.inputs import checked_text

        question = checked_text(question, "--question")
    run_command(
        "qa", model, "question-answering",
        lambda lm: Answerer(
            lm, question=question, top_k=top_k, max_answer_length=max_answer_length, doc_stride=doc_stride,
            allow_empty=allow_empty, max_length=max_length,
        ),
        items, render_answers,
        output=output, resume=resume, as_json=as_json, batch_size=batch_size, dtype=dtype, device=device,
        force=force, threads=threads,
    )
