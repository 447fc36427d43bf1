"""classify, tag and qa against transformers on tiny random Gemma and BLOOM checkpoints.

The oracles: the text-classification and token-classification pipelines (each aggregation
strategy); for qa, transformers 5.23 has no question-answering pipeline any more, so the oracle
is that pipeline's recipe rebuilt from transformers' parts: the tokenizer's question/context
overflow windows, the model's start/end logits, and `select_starts_ends` (the span scorer the
document-question-answering pipeline still ships).

Two documented differences are applied to the oracle's output before comparing: offsets leave out
the leading whitespace that tokenizers put in a token's span, and the same answer span found in two
overlapping windows is reported once.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import lmtool
from lmtool.tasks import Answerer, Classify, Item, Tagger, run_task
from lmtool.tasks.windows import pad_id
from test_tasks_fixtures import checkpoint, hf_model, hf_tokenizer, needs_bloom

TEXTS = [
    "Sarah is from Berlin and works for Acme Corporation.",
    "Wolfgang works for Acme in Berlin.",
    "Sarah and Wolfgang live in Berlin.",
    "Sarah lives in Berlin, Germany.",
    "My name is Wolfgang and I live in Berlin.",
    "Question: where does Wolfgang live? Answer: in Berlin, Germany.",
    "Clara and Jean visited Berlin last summer.",
    "Sarah works for Acme Corporation in New York City.",
]
# Built from words that every fixture tokenizer starts with a "▁"/"Ġ" piece of their own.
LONG_TEXT = (
    "Sarah is from Berlin and works for Acme Corporation, Wolfgang works for Acme in Berlin and Clara lives "
    "in Berlin, Germany since last summer, Wolfgang is near Acme Corporation with Clara and called Wolfgang "
    "from Berlin."
)
FAMILIES = ["gemma", pytest.param("bloom", marks=needs_bloom)]
TOL = 1e-5


def run(task, lm, texts, batch_size=4, questions=None) -> list[dict]:
    items = [Item(i, text=t, question=questions[i] if questions else None) for i, t in enumerate(texts)]
    records: list[dict] = []
    run_task(task, items, lm.model, pad_id=pad_id(lm.tokenizer), batch_size=batch_size, emit=records.append)
    assert [r["id"] for r in records] == list(range(len(texts)))
    return records


def trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())


def word_safe(folder, texts, least=4):
    """The texts on which transformers' word heuristic and lmtool's rule must agree: no token is
    whitespace only and no two tokens share a character (those cases are tested on crafted logits)."""
    tok = hf_tokenizer(folder)
    safe = []
    for text in texts:
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        blank = any(text[s:e].isspace() for s, e in offsets)
        shared = any(b[0] < a[1] for a, b in zip(offsets, offsets[1:]))
        if not blank and not shared:
            safe.append(text)
    assert len(safe) >= least, "the fixture tokenizer changed: too few texts left for the oracle"
    return safe


# --- classify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "labels,problem_type,function",
    [("classes", None, None), ("classes", "multi_label_classification", None), ("one", None, "none")],
)
def test_classify_matches_the_text_classification_pipeline(family, labels, problem_type, function):
    from transformers import pipeline

    folder = checkpoint(family, "sequence-classification", labels, problem_type)
    lm = lmtool.load(folder, task="sequence-classification")
    ours = run(Classify(lm, top_k=None, threshold=0.0), lm, TEXTS)
    pipe = pipeline("text-classification", model=hf_model(folder), tokenizer=hf_tokenizer(folder))
    kwargs = {"function_to_apply": function} if function else {}
    for text, record in zip(TEXTS, ours):
        expected = pipe(text, top_k=None, **kwargs)
        assert [r["label"] for r in record["labels"]] == [e["label"] for e in expected]
        assert [r["score"] for r in record["labels"]] == pytest.approx([e["score"] for e in expected], abs=TOL)
        assert record["label"] == expected[0]["label"]
        assert record["score"] == pytest.approx(expected[0]["score"], abs=TOL)


def test_classify_multi_label_threshold_and_top_k():
    folder = checkpoint("gemma", "sequence-classification", "classes", "multi_label_classification")
    lm = lmtool.load(folder)
    everything = run(Classify(lm, top_k=None, threshold=0.0), lm, TEXTS)
    cut = sorted(r["score"] for rec in everything for r in rec["labels"])[len(TEXTS) * 3 // 2]
    kept = run(Classify(lm, top_k=None, threshold=cut), lm, TEXTS)
    two = run(Classify(lm, top_k=2, threshold=0.0), lm, TEXTS)
    for full, above, top in zip(everything, kept, two):
        assert above["labels"] == [r for r in full["labels"] if r["score"] >= cut]
        assert top["labels"] == full["labels"][:2]
        if not above["labels"]:
            assert above["label"] is None


def test_classify_batches_without_a_pad_token(tmp_path):
    """A decoder config without pad_token_id still batches: padding comes from EOS under the mask."""
    import json
    import shutil

    folder = tmp_path / "nopad"
    shutil.copytree(checkpoint("gemma", "sequence-classification", "classes"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    lm = lmtool.load(folder)
    assert lm.tokenizer.pad_id is None and pad_id(lm.tokenizer) == lm.tokenizer.eos_ids[0]
    batched = run(Classify(lm, top_k=None), lm, TEXTS, batch_size=len(TEXTS))
    alone = run(Classify(lm, top_k=None), lm, TEXTS, batch_size=1)
    for a, b in zip(batched, alone):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert [x["score"] for x in a["labels"]] == pytest.approx([x["score"] for x in b["labels"]], abs=TOL)


# --- tag -----------------------------------------------------------------------------------------


def pipeline_entities(pipe_output: list[dict], text: str) -> list[tuple]:
    entities = []
    for e in pipe_output:
        start, end = trimmed(text, e["start"], e["end"])
        if start < end:
            entities.append((e.get("entity_group", e.get("entity")), start, end, float(e["score"])))
    return entities


def our_entities(record: dict) -> list[tuple]:
    return [(e["label"], e["start"], e["end"], e["score"]) for e in record["entities"]]


def assert_same_entities(ours: list[tuple], expected: list[tuple], text: str) -> None:
    assert [e[:3] for e in ours] == [e[:3] for e in expected], text
    assert [e[3] for e in ours] == pytest.approx([e[3] for e in expected], abs=TOL)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_tag_matches_the_token_classification_pipeline(family, strategy):
    from transformers import pipeline

    folder = checkpoint(family, "token-classification")
    texts = word_safe(folder, TEXTS)
    lm = lmtool.load(folder)
    ours = run(Tagger(lm, aggregation=strategy), lm, texts, batch_size=3)
    pipe = pipeline("token-classification", model=hf_model(folder), tokenizer=hf_tokenizer(folder),
                    aggregation_strategy=strategy)
    found = 0
    for text, record in zip(texts, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pipeline's "fallback heuristic" warning
            expected = pipeline_entities(pipe(text), text)
        assert_same_entities(our_entities(record), expected, text)
        for e in record["entities"]:
            assert text[e["start"] : e["end"]] == e["text"] and e["text"] == e["text"].strip()
        found += len(expected)
    assert found, "random weights predicted nothing but O: the comparison tested nothing"


def stitched_pipeline_entities(folder, text: str, capacity: int, stride: int, strategy: str) -> list[tuple]:
    """The pipeline's aggregation over logits that transformers computes window by window, each
    token taking the logits of the first window that holds it."""
    from transformers import pipeline

    tok, model = hf_tokenizer(folder), hf_model(folder)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    front = [tok.bos_token_id] if folder.name.startswith("gemma") else []
    logits = torch.zeros(len(ids), model.config.num_labels)
    filled = torch.zeros(len(ids), dtype=torch.bool)
    start = 0
    while True:
        window = ids[start : start + capacity]
        with torch.inference_mode():
            out = model(torch.tensor([front + window])).logits[0, len(front) :]
        fresh = ~filled[start : start + len(window)]
        logits[start : start + len(window)][fresh] = out[fresh]
        filled[start : start + len(window)] = True
        if start + capacity >= len(ids):
            break
        start += capacity - stride
    assert filled.all()
    pipe = pipeline("token-classification", model=model, tokenizer=tok)
    outputs = {
        "logits": logits[None], "input_ids": torch.tensor([ids]), "offset_mapping": torch.tensor([offsets]),
        "special_tokens_mask": torch.zeros(1, len(ids), dtype=torch.long), "sentence": text, "is_last": True,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe.postprocess([outputs], aggregation_strategy=pipe._sanitize_parameters(
            aggregation_strategy=strategy)[2]["aggregation_strategy"])
    return pipeline_entities(result, text)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["simple", "average"])
def test_tag_long_inputs_in_overlapping_windows(family, strategy):
    folder = checkpoint(family, "token-classification")
    (text,) = word_safe(folder, [LONG_TEXT], least=1)
    lm = lmtool.load(folder)
    front = 1 if family == "gemma" else 0
    capacity, stride = 12, 4
    tagger = Tagger(lm, aggregation=strategy, stride=stride, max_length=capacity + front)
    n = len(lm.tokenizer.encode(text, add_special_tokens=False))
    assert n > 3 * capacity  # several windows
    record = run(tagger, lm, [text], batch_size=2)[0]
    expected = stitched_pipeline_entities(folder, text, capacity, stride, strategy)
    assert_same_entities(our_entities(record), expected, text)
    spans = [(e["start"], e["end"]) for e in record["entities"]]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # in order, no duplicates, no overlaps


def test_tag_window_that_fits_changes_nothing():
    folder = checkpoint("gemma", "token-classification")
    lm = lmtool.load(folder)
    plain = run(Tagger(lm, aggregation="first"), lm, TEXTS)
    windowed = run(Tagger(lm, aggregation="first", stride=8, max_length=64), lm, TEXTS)
    assert plain == windowed


def test_tag_too_long_without_stride_is_an_item_error():
    folder = checkpoint("gemma", "token-classification")
    lm = lmtool.load(folder)
    records = run(Tagger(lm, max_length=8), lm, ["short.", TEXTS[0]])
    assert "entities" in records[0]
    assert records[1]["error_type"] == "too-long" and "--stride" in records[1]["error"]


# --- qa ------------------------------------------------------------------------------------------


def oracle_answers(folder, question, context, *, max_length, stride, max_answer_length, top_k, allow_empty, hf=None):
    """transformers' (v4) question-answering pipeline, rebuilt from its parts."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    tok = hf_tokenizer(folder)
    model = hf or hf_model(folder)
    enc = tok(question, context, truncation="only_second", max_length=max_length, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True)
    best: dict[tuple[int, int], float] = {}
    null = 1e6
    for k, ids in enumerate(enc["input_ids"]):
        p_mask = np.array([[0 if s == 1 else 1 for s in enc.sequence_ids(k)]])
        p_mask[0, 0] = 0  # position 0 plays the CLS token: the null answer
        with torch.inference_mode():
            out = model(torch.tensor([ids]))
        start, end = (out.start_logits, out.end_logits) if hasattr(out, "start_logits") else out.logits.unbind(-1)
        starts, ends, scores, null = select_starts_ends(
            start.numpy(), end.numpy(), p_mask, np.ones((1, len(ids)), dtype=np.int64), null,
            top_k=200, handle_impossible_answer=True, max_answer_len=max_answer_length,
        )
        found = 0
        for s, e, score in zip(starts, ends, scores):
            if s == 0 or found == top_k:
                continue
            span = trimmed(context, enc["offset_mapping"][k][s][0], enc["offset_mapping"][k][e][1])
            if span[0] < span[1]:
                best[span] = max(best.get(span, -1.0), float(score))
                found += 1
    answers = [(context[s:e], score) for (s, e), score in best.items()]
    if allow_empty:
        answers.append((None, null))
    return sorted(answers, key=lambda a: -a[1])[:top_k]


CONTEXT = " ".join(TEXTS)
QUESTIONS = ["Where does Wolfgang live?", "Who works for Acme?"]


def assert_same_answers(record: dict, expected: list[tuple]) -> None:
    assert [a["answer"] for a in record["answers"]] == [e[0] for e in expected]
    assert [a["score"] for a in record["answers"]] == pytest.approx([e[1] for e in expected], abs=TOL)
    assert record["no_answer"] == (expected[0][0] is None)


@needs_bloom
@pytest.mark.parametrize("max_length,stride", [(512, 128), (40, 10)])
@pytest.mark.parametrize("allow_empty", [False, True])
def test_qa_matches_the_pipeline_recipe_on_bloom(max_length, stride, allow_empty):
    folder = checkpoint("bloom", "question-answering")
    lm = lmtool.load(folder)
    answerer = Answerer(lm, top_k=3, max_answer_length=6, doc_stride=stride, allow_empty=allow_empty,
                        max_length=max_length)
    records = run(answerer, lm, [CONTEXT] * len(QUESTIONS), batch_size=3, questions=QUESTIONS)
    for question, record in zip(QUESTIONS, records):
        expected = oracle_answers(folder, question, CONTEXT, max_length=max_length, stride=stride,
                                  max_answer_length=6, top_k=3, allow_empty=allow_empty)
        assert_same_answers(record, expected)
        for a in record["answers"]:
            if a["answer"] is not None:
                assert CONTEXT[a["start"] : a["end"]] == a["answer"]


def gemma_qa_checkpoint(tmp_path):
    """Gemma has no QA class in transformers; its generic QA head is Linear(hidden, 2) with bias,
    which is exactly a two-label token-classification head. Save one and rename the head."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    source = checkpoint("gemma", "token-classification", "none", None, 3)
    folder = tmp_path / "gemma-qa"
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    weights = {k.replace("score.", "qa_outputs."): v for k, v in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GemmaForQuestionAnswering"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, hf_model(source)


@pytest.mark.parametrize("allow_empty", [False, True])
def test_qa_on_gemma_matches_the_recipe_with_its_generic_head(tmp_path, allow_empty):
    folder, oracle = gemma_qa_checkpoint(tmp_path)
    lm = lmtool.load(folder)
    assert lm.task == "question-answering"
    answerer = Answerer(lm, top_k=2, max_answer_length=5, doc_stride=8, allow_empty=allow_empty, max_length=30)
    record = run(answerer, lm, [CONTEXT], questions=QUESTIONS[:1])[0]
    expected = oracle_answers(folder, QUESTIONS[0], CONTEXT, max_length=30, stride=8, max_answer_length=5,
                              top_k=2, allow_empty=allow_empty, hf=oracle)
    assert_same_answers(record, expected)
