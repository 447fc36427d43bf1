"""Model windows and character spans, shared by classify, tag and qa."""

from __future__ import annotations

from ..errors import LmtoolError
from ..settings import DEFAULT_MAX_LENGTH
from ..tokenizer import Tokenizer



def window_length(config, max_length: int | None) -> int:
    """Tokens one forward pass may take: --max-length, capped by the config's position limit
    (BLOOM's ALiBi has none)."""
    limit = max_length or DEFAULT_MAX_LENGTH
    positions = getattr(config, "max_position_embeddings", None)
    return min(limit, positions) if positions else limit


def special_ends(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BOS for Gemma, none for BLOOM)."""
    front = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    back = [tok.eos_ids[0]] if tok.add_eos and tok.eos_ids else []
    return front, back


def pad_id(tok: Tokenizer) -> int:
    """Any id will do under the attention mask: the pad token, else EOS (what users set by hand
    for decoder models without one), else 0."""
    if tok.pad_id is not None:
        return tok.pad_id
    return tok.eos_ids[0] if tok.eos_ids else 0


def split_windows(n: int, capacity: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `capacity` tokens covering 0..n, each sharing
    `overlap` tokens with the one before it."""
    if capacity <= 0:
        raise ValueError("a window needs room for at least one token")
    if n <= capacity:
        return [(0, n)]
    if not 0 <= overlap < capacity:
        raise LmtoolError(f"the stride ({overlap}) must be smaller than the window ({capacity} tokens)")
    step = capacity - overlap
    spans = []
    start = 0
    while True:
        spans.append((start, min(start + capacity, n)))
        if start + capacity >= n:
            return spans
        start += step


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without the whitespace that SentencePiece ("▁word") and byte-level BPE ("Ġword")
    tokens carry in their offsets."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end

