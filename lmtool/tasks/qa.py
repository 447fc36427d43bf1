"""Extractive question answering: the best context spans, with a document stride for long contexts.

Each window is [BOS] question context-part [EOS] (the specials as the tokenizer adds them); the
context parts overlap by --doc-stride tokens. In each window the start and end logits are turned
into probabilities over the context tokens plus position 0, the null position (BOS, or the first
question token where the tokenizer adds none), as transformers' question-answering pipeline did:
a span's score is p_start(i) * p_end(j) with i <= j < i + max_answer_length, and the null score
is p_start(0) * p_end(0). Spans from all windows are pooled, the same character span counted
once at its best score. With allow_empty the null answer (its lowest score over the windows)
competes too, and wins as a "no answer" result.
"""

from __future__ import annotations

import torch

from ..errors import LmtoolError
from .inputs import Item, ItemError
from .windows import special_ends, split_windows, trim_span, window_length

MASKED = -10000.0  # the pipeline's logit for positions that cannot be part of an answer


def window_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context: slice, max_answer_length: int
) -> tuple[list[tuple[float, int, int]], float]:
    """Candidate spans of one window, best first, as (score, i, j) positions within `context`,
    and the window's null score."""
    allowed = torch.zeros_like(start_logits, dtype=torch.bool)
    allowed[context] = True
    allowed[0] = True
    p_start = torch.softmax(torch.where(allowed, start_logits.float(), MASKED), -1)
    p_end = torch.softmax(torch.where(allowed, end_logits.float(), MASKED), -1)
    null = float(p_start[0] * p_end[0])
    scores = torch.outer(p_start[context], p_end[context])
    n = scores.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    valid = (j >= i) & (j - i < max_answer_length)
    scores = torch.where(valid, scores, -1.0).flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= 0]
    return [(score, k // n, k % n) for score, k in zip(scores[order].tolist(), order.tolist())], null


def best_answers(
    context: str, windows: list[tuple[list[tuple[float, int, int]], int]], offsets: list[tuple[int, int]], top_k: int
) -> list[dict]:
    """The top_k distinct non-empty answers from each window's ranked spans; each window is
    (spans, first context token of the window)."""
    best: dict[tuple[int, int], float] = {}
    for spans, first in windows:
        found = 0
        for score, i, j in spans:
            start, end = trim_span(context, offsets[first + i][0], offsets[first + j][1])
            if start == end:
                continue
            if best.get((start, end), -1.0) < score:
                best[(start, end)] = score
            found += 1
            if found == top_k:
                break
    ranked = sorted(best.items(), key=lambda pair: -pair[1])[:top_k]
    return [{"answer": context[s:e], "score": score, "start": s, "end": e} for (s, e), score in ranked]


def answer_record(answers: list[dict], null_score: float, top_k: int, allow_empty: bool) -> dict:
    if allow_empty:
        answers = sorted(answers + [{"answer": None, "score": null_score, "start": None, "end": None}],
                         key=lambda a: -a["score"])[:top_k]
    best = answers[0] if answers else {"answer": None, "score": null_score, "start": None, "end": None}
    return {**best, "no_answer": best["answer"] is None, "answers": answers}


class Answerer:
    """The qa task for run_task. Each item's text is the context; its question is item.question,
    else the default question."""

    def __init__(self, lm, *, question: str | None = None, top_k: int = 1, max_answer_length: int = 15,
                 doc_stride: int = 128, allow_empty: bool = False, max_length: int | None = None):
        if top_k < 1 or max_answer_length < 1 or doc_stride < 0:
            raise LmtoolError("--top-k and --max-answer-length must be at least 1, --doc-stride at least 0")
        self.tok = lm.tokenizer
        self.question = question
        self.top_k, self.max_answer_length = top_k, max_answer_length
        self.doc_stride, self.allow_empty = doc_stride, allow_empty
        self.front, self.back = special_ends(self.tok)
        self.window = window_length(lm.config, max_length)
        if doc_stride >= self.window:
            raise LmtoolError(f"--doc-stride {doc_stride} must be less than the window ({self.window} tokens)")

    def prepare(self, item: Item, text: str):
        question = item.question if item.question is not None else self.question
        if question is None or not question.strip():
            raise ItemError("invalid", f"{item.key}: no question (give --question, or \"question\" in --jsonl)")
        prefix = self.front + self.tok.encode(question, add_special_tokens=False)
        capacity = self.window - len(prefix) - len(self.back)
        if capacity <= 0:
            raise ItemError(
                "too-long", f"{item.key}: the question leaves no room for context in a window of {self.window}"
            )
        enc = self.tok.encode_with_offsets(text, add_special_tokens=False)
        if self.doc_stride >= capacity and len(enc.ids) > capacity:
            raise ItemError(
                "invalid", f"{item.key}: --doc-stride {self.doc_stride} must be less than the {capacity} tokens "
                f"a window of {self.window} leaves for context after this question",
            )
        spans = split_windows(len(enc.ids), capacity, self.doc_stride)
        windows = [prefix + enc.ids[a:b] + self.back for a, b in spans]
        return windows, (text, question, enc, spans, len(prefix))

    def finish(self, item: Item, state, outputs) -> dict:
        text, question, enc, spans, skip = state
        ranked, null_score = [], 1.0
        for (a, b), (start_logits, end_logits) in zip(spans, outputs):
            window, null = window_spans(start_logits, end_logits, slice(skip, skip + b - a), self.max_answer_length)
            special = {i - a for i in range(a, b) if enc.special[i]}
            ranked.append(([s for s in window if s[1] not in special and s[2] not in special], a))
            null_score = min(null_score, null)
        answers = best_answers(text, ranked, enc.offsets, self.top_k)
        return {"question": question, **answer_record(answers, null_score, self.top_k, self.allow_empty)}
