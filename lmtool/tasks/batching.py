"""Length-sorted batching and the driver the three task commands share.

Items are taken in blocks, in input order. Each block's model inputs (one or more windows per
item) are sorted by length and cut into batches, so a batch pads to about the same length; the
outputs are put back in input order and each item's record is written before the next block
starts. An interrupted run therefore loses at most one block, and `--resume` picks up after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from .inputs import Item, ItemError


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _row(output: Any, row: int, length: int) -> Any:
    """One sequence's part of a batch output, with the padding cut off."""
    if isinstance(output, tuple):  # question answering: (start, end)
        return tuple(o[row, :length] for o in output)
    if output.dim() == 2:  # sequence classification: [B, num_labels]
        return output[row]
    return output[row, :length]


def run_model(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[Any]:
    """Forward every sequence (right-padded, with an attention mask) and return each one's
    float32 CPU output in the order given."""
    device = next(model.parameters()).device
    results: list[Any] = [None] * len(sequences)
    with torch.inference_mode():
        for batch in sorted_batches([len(s) for s in sequences], batch_size):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(sequences[index])] = torch.tensor(sequences[index])
                mask[row, : len(sequences[index])] = 1
            output = model(ids.to(device), attention_mask=mask.to(device))
            output = tuple(o.float().cpu() for o in output) if isinstance(output, tuple) else output.float().cpu()
            for row, index in enumerate(batch):
                results[index] = _row(output, row, len(sequences[index]))
    return results


class Task(Protocol):
    """What a task command plugs into the driver."""

    def prepare(self, item: Item, text: str) -> tuple[list[list[int]], Any]:
        """The item's model inputs (windows of token ids) and whatever finish() needs; may raise ItemError."""

    def finish(self, item: Item, state: Any, outputs: list[Any]) -> dict:
        """The item's result fields from the outputs of its windows."""


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @classmethod
    def combined(cls, summaries: list["RunSummary"]) -> "RunSummary":
        """The ranks' summaries as one run's: counts added, the time of the slowest."""
        total = cls(seconds=max((s.seconds for s in summaries), default=0.0))
        for summary in summaries:
            total.done += summary.done
            total.failed += summary.failed
            total.tokens += summary.tokens
            for kind, count in summary.errors.items():
                total.errors[kind] = total.errors.get(kind, 0) + count
        return total


def run_task(
    task: Task,
    items: Iterable[Item],
    model,
    *,
    pad_id: int,
    batch_size: int,
    emit: Callable[[dict], None],
    block_size: int | None = None,
    on_block: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run task over items; emit one record per item in input order. on_block(n) is told how
    many items each finished block held (for a progress bar)."""
    block_size = block_size or max(256, 16 * batch_size)
    summary = RunSummary()
    started = time.perf_counter()
    block: list[Item] = []
    for item in items:
        block.append(item)
        if len(block) == block_size:
            _run_block(task, block, model, pad_id, batch_size, emit, summary)
            on_block and on_block(len(block))
            block = []
    if block:
        _run_block(task, block, model, pad_id, batch_size, emit, summary)
        on_block and on_block(len(block))
    summary.seconds = time.perf_counter() - started
    return summary


def _run_block(task: Task, block: list[Item], model, pad_id: int, batch_size: int, emit, summary: RunSummary) -> None:
    prepared: list[tuple[Any, int, int] | ItemError] = []
    sequences: list[list[int]] = []
    for item in block:
        try:
            windows, state = task.prepare(item, item.load())
        except ItemError as error:
            prepared.append(error)
            continue
        prepared.append((state, len(sequences), len(windows)))
        sequences.extend(windows)
    outputs = run_model(model, sequences, batch_size, pad_id) if sequences else []
    summary.tokens += sum(len(s) for s in sequences)
    for item, entry in zip(block, prepared):
        if isinstance(entry, ItemError):
            summary.failed += 1
            summary.errors[entry.kind] = summary.errors.get(entry.kind, 0) + 1
            emit(item.error_record(entry))
            continue
        state, first, count = entry
        emit({**item.head(), **task.finish(item, state, outputs[first : first + count])})
        summary.done += 1
