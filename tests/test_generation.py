"""Sampling against transformers' logits processors, and streamed text with stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmtool.generation import SamplingParams, TextStream, process_logits, sample
from lmtool.tokenizer import Tokenizer

from helpers import gemma_style_tokenizer


def transformers_processed(logits, ids, params: SamplingParams):
    steps = []
    if params.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    steps.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        steps.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        steps.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        steps.append(MinPLogitsWarper(params.min_p))
    for step in steps:
        logits = step(ids, logits)
    return logits


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
])
def test_filters_match_transformers(params):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ids = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, ids, True)
    ours = process_logits(logits, params, seen)
    theirs = transformers_processed(logits.clone(), ids, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-5)


def test_greedy_is_argmax_and_seeded_sampling_repeats():
    logits = torch.randn(3, 40)
    assert torch.equal(sample(logits, SamplingParams(temperature=0), None), logits.argmax(-1))
    params = SamplingParams(temperature=1.0)
    draw = lambda seed: sample(logits, params, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert any(not torch.equal(draw(7), draw(s)) for s in range(8, 20))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(gemma_style_tokenizer(), bos_id=2, eos_ids=[1], pad_id=0, add_bos=True)


def stream_all(tokenizer, text, stop):
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return "".join(pieces), stream


def test_stream_reassembles_text_including_multibyte(tokenizer):
    text = "Zürich and São Paulo: naïve café."
    streamed, stream = stream_all(tokenizer, text, [])
    assert streamed == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    assert not stream.stopped


def test_stop_string_spanning_tokens_is_cut_and_never_printed(tokenizer):
    text = "Simple is better than complex. Complex is better"
    streamed, stream = stream_all(tokenizer, text, ["than complex"])
    assert stream.stopped
    assert streamed == "Simple is better "
    assert "than" not in streamed
