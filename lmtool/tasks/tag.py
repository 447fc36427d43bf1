"""Token classification: per-token labels, grouped into entities.

The strategies are those of transformers' token-classification pipeline:
  none     every token with its own label (ignored labels dropped)
  simple   tokens grouped into entities by B-/I- labels
  first    each word takes the label of its first token, then grouped
  average  each word takes the label of its tokens' averaged scores, then grouped
  max      each word takes the label of its most confident token, then grouped
Words are found from character offsets, so that the same rule holds for SentencePiece ("▁word",
lone "▁" tokens, byte-fallback pieces) and byte-level BPE ("Ġword", characters split into
bytes): a token continues the word before it when it shares a character with it, follows a
whitespace-only token, or neither it nor the character before it is whitespace. Entity offsets
are character offsets into the input with the tokens' leading whitespace left out.

Inputs longer than the window are cut into windows that overlap by --stride tokens. The model is a
decoder, so each token keeps the scores from the first window that holds it (where it has the
most context to its left) and aggregation runs once over the whole text: no entity is reported
twice, and none is cut at a window edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..choices import AGGREGATIONS
from ..errors import LmtoolError
from .inputs import Item, ItemError
from .windows import special_ends, split_windows, trim_span, window_length

STRATEGIES = AGGREGATIONS


@dataclass
class Entity:
    label: str
    score: float
    start: int
    end: int

    def record(self, text: str) -> dict | None:
        start, end = trim_span(text, self.start, self.end)
        if start == end:  # whitespace only
            return None
        return {"text": text[start:end], "label": self.label, "score": self.score, "start": start, "end": end}


def word_starts(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """For each token, whether it begins a new word (see the module docstring)."""
    starts = []
    previous_end, previous_blank = None, False
    for start, end in offsets:
        if previous_end is None:
            new = True
        elif start < previous_end or previous_blank:
            new = False
        else:
            here = text[start] if start < len(text) else " "
            before = text[start - 1] if start > 0 else " "
            new = here.isspace() or before.isspace()
        starts.append(new)
        previous_end, previous_blank = end, text[start:end].isspace()
    return starts


def _best(row: torch.Tensor, labels: list[str], start: int, end: int) -> Entity:
    index = int(row.argmax())
    return Entity(labels[index], float(row[index]), start, end)


def token_entities(probs: torch.Tensor, offsets, labels: list[str]) -> list[Entity]:
    scores, indices = probs.max(-1)
    return [Entity(labels[i], p, s, e) for i, p, (s, e) in zip(indices.tolist(), scores.tolist(), offsets)]


def word_entities(text: str, probs: torch.Tensor, offsets, labels: list[str], strategy: str) -> list[Entity]:
    bounds = [i for i, new in enumerate(word_starts(text, offsets)) if new] + [len(offsets)]
    entities = []
    for i, j in zip(bounds, bounds[1:]):
        word = probs[i:j]
        if strategy == "first":
            row = word[0]
        elif strategy == "max":
            row = word[int(word.max(-1).values.argmax())]
        elif strategy == "average":
            row = word.mean(0)
        else:
            raise LmtoolError(f"unknown aggregation '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
        entities.append(_best(row, labels, offsets[i][0], offsets[j - 1][1]))
    return entities


def split_tag(label: str) -> tuple[str, str]:
    """("B"|"I", entity type); a label without a B-/I- prefix continues like I-."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def group_entities(entities: list[Entity]) -> list[Entity]:
    """Merge runs of the same entity type: a B- label, or another type, starts a new entity.
    A piece of a character split across tokens stays with the entity holding the character."""
    groups: list[list[Entity]] = []
    for entity in entities:
        bi, kind = split_tag(entity.label)
        previous = groups[-1][-1] if groups else None
        if previous and (entity.start < previous.end or bi != "B" and split_tag(previous.label)[1] == kind):
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        Entity(split_tag(g[0].label)[1], sum(e.score for e in g) / len(g), g[0].start, g[-1].end) for g in groups
    ]


def aggregate(
    text: str, probs: torch.Tensor, offsets: list[tuple[int, int]], labels: list[str], strategy: str,
    ignore: tuple[str, ...] = ("O",),
) -> list[dict]:
    """Entities of one text from the label probabilities [n, num_labels] of its (non-special) tokens."""
    if strategy in ("none", "simple"):
        entities = token_entities(probs, offsets, labels)
    else:
        entities = word_entities(text, probs, offsets, labels, strategy)
    if strategy != "none":
        entities = group_entities(entities)
    records = (e.record(text) for e in entities if e.label not in ignore)
    return [r for r in records if r is not None]


def stitch(outputs: list[torch.Tensor], spans: list[tuple[int, int]], skip: int) -> torch.Tensor:
    """Per-token logits of the whole text from window outputs: each token from the first window
    that holds it. skip = special tokens in front of each window."""
    n = spans[-1][1]
    result = outputs[0].new_empty((n, outputs[0].shape[-1]))
    for (a, b), out in reversed(list(zip(spans, outputs))):
        result[a:b] = out[skip : skip + b - a]
    return result


class Tagger:
    """The tag task for run_task."""

    def __init__(self, lm, *, aggregation: str = "simple", stride: int | None = None,
                 max_length: int | None = None, ignore: tuple[str, ...] = ("O",)):
        if aggregation not in STRATEGIES:
            raise LmtoolError(f"unknown aggregation '{aggregation}'; choose one of: {', '.join(STRATEGIES)}")
        self.tok, self.labels = lm.tokenizer, lm.config.labels
        self.aggregation, self.stride, self.ignore = aggregation, stride, tuple(ignore)
        self.front, self.back = special_ends(self.tok)
        self.window = window_length(lm.config, max_length)
        self.capacity = self.window - len(self.front) - len(self.back)
        if self.capacity <= 0:
            raise LmtoolError(f"--max-length {self.window} leaves no room for text")
        if stride is not None and not 0 <= stride < self.capacity:
            raise LmtoolError(
                f"--stride must be at least 0 and less than {self.capacity} (the window less special tokens)"
            )

    def prepare(self, item: Item, text: str):
        enc = self.tok.encode_with_offsets(text, add_special_tokens=False)
        n = len(enc.ids)
        if n > self.capacity and self.stride is None:
            raise ItemError(
                "too-long", f"{item.key}: {n} tokens, more than the {self.capacity} that fit in one window; "
                "pass --stride N to tag it in overlapping windows"
            )
        spans = split_windows(n, self.capacity, self.stride or 0)
        windows = [self.front + enc.ids[a:b] + self.back for a, b in spans]
        return windows, (text, enc, spans)

    def finish(self, item: Item, state, outputs) -> dict:
        text, enc, spans = state
        logits = stitch(outputs, spans, len(self.front))
        keep = [i for i, special in enumerate(enc.special) if not special]
        probs = torch.softmax(logits[keep].float(), -1)
        offsets = [enc.offsets[i] for i in keep]
        return {"entities": aggregate(text, probs, offsets, self.labels, self.aggregation, self.ignore)}
