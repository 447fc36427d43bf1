"""Sequence classification: label scores from the logits pooled at the last real token."""

from __future__ import annotations

import torch

from .inputs import Item, ItemError
from .windows import window_length


def scoring(config) -> str:
    """softmax (single label), sigmoid (problem_type multi_label_classification) or none (the raw
    value: problem_type regression, or a single output)."""
    if config.problem_type == "regression" or config.num_labels == 1:
        return "none"
    if config.problem_type == "multi_label_classification":
        return "sigmoid"
    return "softmax"


def label_scores(logits: torch.Tensor, labels: list[str], how: str, top_k: int | None, threshold: float) -> dict:
    """The record fields for one input: "label" and "score" of the best, and "labels", the top_k
    best (every label for top_k None). For multi-label scoring, "labels" keeps only those at or
    above the threshold and "label" is null when none is."""
    logits = logits.float()
    if how == "softmax":
        scores = torch.softmax(logits, -1)
    elif how == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = logits
    ranked = sorted(zip(labels, scores.tolist()), key=lambda pair: -pair[1])
    if how == "sigmoid":
        ranked = [pair for pair in ranked if pair[1] >= threshold]
    if top_k is not None:
        ranked = ranked[:top_k]
    best = ranked[0] if ranked else (None, None)
    return {"label": best[0], "score": best[1], "labels": [{"label": k, "score": v} for k, v in ranked]}


class Classify:
    """The classify task for run_task."""

    def __init__(self, lm, *, top_k: int | None = 1, threshold: float = 0.5, max_length: int | None = None):
        self.tok = lm.tokenizer
        self.labels = lm.config.labels
        self.how = scoring(lm.config)
        self.top_k, self.threshold = top_k, threshold
        self.window = window_length(lm.config, max_length)

    def prepare(self, item: Item, text: str):
        ids = self.tok.encode(text)
        if len(ids) > self.window:
            raise ItemError(
                "too-long", f"{item.key}: {len(ids)} tokens, more than the {self.window} that fit in one window"
            )
        return [ids], None

    def finish(self, item: Item, state, outputs) -> dict:
        return label_scores(outputs[0], self.labels, self.how, self.top_k, self.threshold)
