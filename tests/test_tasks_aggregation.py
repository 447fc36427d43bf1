"""Aggregation, windows, offsets and answer spans on crafted logits: multi-byte text, leading
spaces, lone "▁" tokens, B-/I- sequences."""

from __future__ import annotations

import random

import pytest
import torch

from lmtool.tasks.qa import answer_record, best_answers, window_spans
from lmtool.tasks.tag import Entity, aggregate, group_entities, stitch, word_starts
from lmtool.tasks.windows import split_windows
from test_tasks_fixtures import byte_tokenizer, spm_tokenizer

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC"]
TOKENIZERS = {"spm": spm_tokenizer, "bytes": byte_tokenizer}
TEXT = "Sarah flog nach 東京 und Zürich und dann nach São Paulo"  # word strategies keep "Zürich," whole
ENTITIES = [("Sarah", "PER"), ("東京", "LOC"), ("Zürich", "LOC"), ("São Paulo", "LOC")]


def encode(kind: str, text: str):
    enc = TOKENIZERS[kind]().encode(text, add_special_tokens=False)
    return enc.tokens, [tuple(o) for o in enc.offsets]


def owner(text: str, offsets, i: int) -> tuple[str, str] | None:
    """The entity a token belongs to: the one holding its first non-space character; a
    whitespace-only token belongs with the token after it."""
    for start, end in offsets[i:]:
        chars = [k for k in range(start, end) if not text[k].isspace()]
        if chars:
            for word, label in ENTITIES:
                at = text.index(word)
                if at <= chars[0] < at + len(word):
                    return word, label
            return None
    return None


def crafted_logits(text: str, offsets, strong: float = 6.0, inside_only: bool = False) -> torch.Tensor:
    """B- on each entity's first token, I- on the rest (I- on all with inside_only), O elsewhere."""
    logits = torch.zeros(len(offsets), len(LABELS))
    seen = set()
    for i in range(len(offsets)):
        entity = owner(text, offsets, i)
        if entity is None:
            label = "O"
        else:
            label = ("I-" if entity in seen or inside_only else "B-") + entity[1]
            seen.add(entity)
        logits[i, LABELS.index(label)] = strong
    return logits


@pytest.mark.parametrize("kind", ["spm", "bytes"])
@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_entities_and_offsets_on_multibyte_text(kind, strategy):
    tokens, offsets = encode(kind, TEXT)
    assert any(b[0] < a[1] for a, b in zip(offsets, offsets[1:])) or any(t.startswith("<0x") for t in tokens)
    # Averaging B- and I- scores inside a word would blur the label this test is about.
    probs = torch.softmax(crafted_logits(TEXT, offsets, inside_only=strategy == "average"), -1)
    entities = aggregate(TEXT, probs, offsets, LABELS, strategy)
    expected_score = float(probs.max())
    assert [(e["text"], e["label"]) for e in entities] == ENTITIES
    for e in entities:
        assert (e["start"], e["end"]) == (TEXT.index(e["text"]), TEXT.index(e["text"]) + len(e["text"]))
        assert e["score"] == pytest.approx(expected_score, abs=1e-6)


@pytest.mark.parametrize("kind", ["spm", "bytes"])
def test_none_strategy_keeps_tokens_inside_their_words(kind):
    tokens, offsets = encode(kind, TEXT)
    probs = torch.softmax(crafted_logits(TEXT, offsets), -1)
    entities = aggregate(TEXT, probs, offsets, LABELS, "none")
    words = {label: [] for _, label in ENTITIES}
    for word, label in ENTITIES:
        at = TEXT.index(word)
        words[label].append(range(at, at + len(word)))
    for e in entities:
        assert e["text"] == TEXT[e["start"] : e["end"]] == e["text"].strip()
        kind_of = e["label"][2:]
        assert any(e["start"] in r and e["end"] - 1 in r for r in words[kind_of])
    assert {e["label"][2:] for e in entities} == {"PER", "LOC"}


@pytest.mark.parametrize("kind", ["spm", "bytes"])
@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_entities_never_overlap_or_split_a_character(kind, strategy):
    """Random labels: the pieces of one character can disagree, an entity still never shares a
    character with another."""
    tokens, offsets = encode(kind, TEXT)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        probs = torch.softmax(3 * torch.randn(len(offsets), len(LABELS), generator=generator), -1)
        entities = aggregate(TEXT, probs, offsets, LABELS, strategy)
        assert all(a["end"] <= b["start"] for a, b in zip(entities, entities[1:]))
        assert all(TEXT[e["start"] : e["end"]] == e["text"] == e["text"].strip() for e in entities)


def test_word_starts_for_lone_space_tokens_and_split_characters():
    text = "in 東京 Berlin"
    # SentencePiece: a lone "▁" then byte-fallback pieces sharing their character's offsets.
    spm = [(0, 2), (2, 3), (3, 4), (3, 4), (3, 4), (4, 5), (4, 5), (4, 5), (5, 12)]
    assert word_starts(text, spm) == [True, True, False, False, False, False, False, False, True]
    # Byte-level BPE: "Ġæĸ" (2, 4) and "±äº¬" (3, 5) share 東; "ĠBerlin" carries its space.
    assert word_starts(text, [(0, 2), (2, 4), (3, 5), (5, 12)]) == [True, True, False, True]
    # Punctuation and subwords continue a word; a tab separates like a space.
    assert word_starts("Acme,Co\tBerlin", [(0, 2), (2, 4), (4, 5), (5, 7), (7, 8), (8, 14)]) == [
        True, False, False, False, True, False,
    ]
    assert word_starts("Acme,Co\tBerlin", [(0, 2), (2, 4), (4, 5), (5, 7), (7, 14)]) == [
        True, False, False, False, True,
    ]


def test_word_label_disagreement_per_strategy():
    text = "Zürich"
    offsets = [(0, 1), (1, 2), (1, 2), (2, 6)]  # Z, two bytes of ü, rich
    probs = torch.tensor([
        [0.1, 0.1, 0.0, 0.6, 0.1, 0.1],  # B-LOC 0.6
        [0.0, 0.9, 0.0, 0.1, 0.0, 0.0],  # B-PER 0.9 (the most confident token)
        [0.0, 0.5, 0.0, 0.4, 0.1, 0.0],
        [0.0, 0.3, 0.0, 0.5, 0.2, 0.0],
    ])
    one = {s: aggregate(text, probs, offsets, LABELS, s)[0] for s in ("first", "max", "average")}
    assert (one["first"]["label"], one["first"]["score"]) == ("LOC", pytest.approx(0.6))
    assert (one["max"]["label"], one["max"]["score"]) == ("PER", pytest.approx(0.9))
    assert (one["average"]["label"], one["average"]["score"]) == ("PER", pytest.approx(0.45))
    assert all((e["start"], e["end"], e["text"]) == (0, 6, "Zürich") for e in one.values())


def test_b_i_grouping_matches_the_pipeline_on_random_label_runs():
    from transformers import pipeline

    from test_tasks_fixtures import checkpoint, hf_model, hf_tokenizer

    folder = checkpoint("gemma", "token-classification")
    pipe = pipeline("token-classification", model=hf_model(folder), tokenizer=hf_tokenizer(folder))
    rng = random.Random(7)
    for _ in range(200):
        labels = [rng.choice(LABELS) for _ in range(rng.randint(1, 9))]
        ours = [Entity(label, rng.random(), 2 * i, 2 * i + 1) for i, label in enumerate(labels)]
        theirs = pipe.group_entities(
            [{"entity": e.label, "score": e.score, "word": "x", "start": e.start, "end": e.end} for e in ours]
        )
        grouped = group_entities(ours)
        expected = [(t["entity_group"], t["start"], t["end"]) for t in theirs]
        assert [(g.label, g.start, g.end) for g in grouped] == expected
        assert [g.score for g in grouped] == pytest.approx([float(t["score"]) for t in theirs])


def test_ignored_labels_and_whitespace_only_entities_are_dropped():
    text = "a  b"
    offsets = [(0, 1), (1, 2), (2, 4)]  # "a", a lone space, " b"
    probs = torch.eye(len(LABELS))[[1, 3, 5]]  # B-PER, B-LOC (on the space), MISC
    assert [(e["text"], e["label"]) for e in aggregate(text, probs, offsets, LABELS, "none")] == [
        ("a", "B-PER"), ("b", "MISC"),
    ]
    assert aggregate(text, probs, offsets, LABELS, "simple", ignore=("MISC", "O")) == [
        {"text": "a", "label": "PER", "score": 1.0, "start": 0, "end": 1},
    ]


# --- windows -------------------------------------------------------------------------------------


def test_split_windows_cover_everything_with_the_given_overlap():
    assert split_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert split_windows(3, 4, 2) == [(0, 3)]
    for n in range(1, 40):
        for capacity in range(1, 9):
            for overlap in range(capacity):
                spans = split_windows(n, capacity, overlap)
                assert spans[0][0] == 0 and spans[-1][1] == n
                assert all(0 < b - a <= capacity for a, b in spans)
                assert all(prev[1] - nxt[0] == overlap for prev, nxt in zip(spans, spans[1:]))


def test_stitch_takes_each_token_from_the_first_window_holding_it():
    spans = split_windows(10, 4, 2)
    outputs = [torch.full((1 + b - a, 1), float(k)) for k, (a, b) in enumerate(spans)]  # 1 BOS row each
    stitched = stitch(outputs, spans, skip=1)[:, 0].tolist()
    expected = [float(min(k for k, (a, b) in enumerate(spans) if a <= t < b)) for t in range(10)]
    assert stitched == expected


# --- question answering --------------------------------------------------------------------------


def test_best_span_respects_order_and_max_answer_length():
    start = torch.full((12,), -5.0)
    end = torch.full((12,), -5.0)
    start[6], end[4] = 8.0, 9.0  # the best start is after the best end: not a span
    end[9] = 7.0
    spans, null = window_spans(start, end, slice(3, 12), max_answer_length=15)
    score, i, j = spans[0]
    assert (i + 3, j + 3) == (6, 9)
    shorter, _ = window_spans(start, end, slice(3, 12), max_answer_length=3)
    assert all(j - i < 3 for _, i, j in shorter)
    assert (shorter[0][1] + 3, shorter[0][2] + 3) != (6, 9)
    p_start = torch.softmax(torch.cat([start[:1], start[3:]]), -1)  # the null position and the context
    p_end = torch.softmax(torch.cat([end[:1], end[3:]]), -1)
    assert score == pytest.approx(float(p_start[4] * p_end[7]))
    assert null == pytest.approx(float(p_start[0] * p_end[0]))


def test_null_span_wins_only_with_allow_empty():
    start = torch.tensor([9.0, 0.0, 0.0, 0.0, 2.0, 0.0])  # position 0: the null; 1-2: the question
    end = torch.tensor([9.0, 0.0, 0.0, 0.0, 2.0, 1.0])
    spans, null = window_spans(start, end, slice(3, 6), max_answer_length=5)
    context = "ab cd ef"
    offsets = [(0, 2), (2, 5), (5, 8)]
    answers = best_answers(context, [(spans, 0)], offsets, top_k=2)
    assert answers[0]["answer"] == "cd" and null > answers[0]["score"]
    plain = answer_record(answers, null, top_k=2, allow_empty=False)
    assert plain["no_answer"] is False and plain["answer"] == "cd"
    empty = answer_record(answers, null, top_k=2, allow_empty=True)
    assert empty["no_answer"] is True and empty["answer"] is None and empty["score"] == null
    assert [a["answer"] for a in empty["answers"]] == [None, "cd"]


@pytest.mark.parametrize("kind", ["spm", "bytes"])
def test_answer_offsets_on_multibyte_context(kind):
    context = "Er wohnt in Zürich und São Paulo."
    tokens, offsets = encode(kind, context)
    first = next(i for i, (s, e) in enumerate(offsets) if e > context.index("Zürich"))
    last = next(i for i, (s, e) in enumerate(offsets) if e >= context.index("Zürich") + len("Zürich"))
    start, end = torch.zeros(len(tokens) + 1), torch.zeros(len(tokens) + 1)  # position 0: the null
    start[1 + first], end[1 + last] = 10.0, 10.0
    spans, _ = window_spans(start, end, slice(1, len(tokens) + 1), max_answer_length=30)
    (answer,) = best_answers(context, [(spans, 0)], offsets, top_k=1)
    assert (answer["answer"], answer["start"], answer["end"]) == ("Zürich", 12, 18)


def test_the_same_span_from_two_windows_is_reported_once():
    context = "one two three four"
    offsets = [(0, 3), (3, 7), (7, 13), (13, 18)]
    first_window = [(0.6, 1, 1), (0.2, 0, 1)]  # "two", "one two" (window starts at token 0)
    second_window = [(0.5, 0, 0), (0.1, 1, 1)]  # "two" again, "three" (window starts at token 1)
    answers = best_answers(context, [(first_window, 0), (second_window, 1)], offsets, top_k=3)
    assert [(a["answer"], a["score"]) for a in answers] == [("two", 0.6), ("one two", 0.2), ("three", 0.1)]
