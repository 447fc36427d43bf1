"""SentencePiece `tokenizer.model` -> an equivalent `tokenizers.Tokenizer`.

The .model file is a protobuf `ModelProto`; we read the few fields we need straight from the wire
format (no protobuf package): the pieces (text, score, type), the trainer spec (algorithm, byte
fallback, unk) and the normalizer spec (charsmap, dummy prefix, whitespace handling).

BPE: SentencePiece merges, at each step, the adjacent pair whose concatenation is the piece with the
highest score. A `tokenizers` BPE with a merge (left, right) for every way of splitting each normal
piece into two normal pieces, ranked by the merged piece's score, makes the same choices.
Unigram: `tokenizers` runs the same Viterbi search over the same (piece, score) list.
Control pieces (<bos>, <eos>, ...) and the unknown piece become special added tokens;
user-defined pieces become added tokens matched whole, and, like in SentencePiece, decode to
their text (not special) unless the caller names them in `special_tokens`.

Known differences from SentencePiece, shared with transformers' own conversion: the text of a
control piece ("<bos>" typed literally) is matched as that token; and with add_dummy_prefix
(Llama-style models, not Gemma) no "▁" is prepended to a text that already starts with a space or
with a user-defined piece.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import LmtoolError

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPE_NAMES = {UNIGRAM: "unigram", BPE: "bpe", WORD: "word", CHAR: "char"}

SPACE = "\u2581"  # "▁", SentencePiece's visible space


class _WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


# --- protobuf wire format ------------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of a message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0")
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise _WireError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise _WireError("truncated field")
        yield number, value


def _int32(value: int) -> int:
    # Negative int32 values are sign-extended to 64 bits on the wire (pad_id = -1).
    return value - (1 << 64) if value >= 1 << 63 else value


# --- the model proto -----------------------------------------------------------------------------


@dataclass
class Piece:
    text: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SentencePieceModel:
    """The parts of a ModelProto that decide tokenization, with the proto's defaults."""

    pieces: list[Piece] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def piece(self, piece_id: int) -> str | None:
        """The text of a piece id, None when the id is unset (-1) or out of range."""
        return self.pieces[piece_id].text if 0 <= piece_id < len(self.pieces) else None

    def special_tokens(self) -> dict[str, str]:
        """tokenizer_config.json's bos/eos/pad/unk_token, from the ids the model was trained with."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id, "unk_token": self.unk_id}
        return {key: self.piece(i) for key, i in ids.items() if self.piece(i) is not None}


def _read_piece(data: bytes) -> Piece:
    piece = Piece(text="")
    for number, value in _fields(data):
        if number == 1:
            piece.text = value.decode("utf-8")
        elif number == 2:
            (piece.score,) = struct.unpack("<f", value)
        elif number == 3:
            piece.type = value
    return piece


# TrainerSpec field number -> (attribute, converter)
_TRAINER_FIELDS = {
    3: ("model_type", int),
    24: ("treat_whitespace_as_suffix", bool),
    35: ("byte_fallback", bool),
    40: ("unk_id", _int32),
    41: ("bos_id", _int32),
    42: ("eos_id", _int32),
    43: ("pad_id", _int32),
}
# NormalizerSpec field number -> (attribute, converter)
_NORMALIZER_FIELDS = {
    2: ("precompiled_charsmap", bytes),
    3: ("add_dummy_prefix", bool),
    4: ("remove_extra_whitespaces", bool),
    5: ("escape_whitespaces", bool),
}


def _read_spec(model: SentencePieceModel, data: bytes, known: dict) -> None:
    for number, value in _fields(data):
        if number in known:
            name, convert = known[number]
            setattr(model, name, convert(value))


def read_model(path: str | Path) -> SentencePieceModel:
    """Parse a SentencePiece .model file; LmtoolError naming the file if it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmtoolError(f"{path}: no such file") from None
    except OSError as exc:
        raise LmtoolError(f"{path}: cannot read ({exc.strerror})") from None
    model = SentencePieceModel()
    try:
        for number, value in _fields(data):
            if number == 1:
                model.pieces.append(_read_piece(value))
            elif number == 2:
                _read_spec(model, value, _TRAINER_FIELDS)
            elif number == 3:
                _read_spec(model, value, _NORMALIZER_FIELDS)
    except (_WireError, UnicodeDecodeError, struct.error, TypeError, AttributeError) as exc:
        # TypeError/AttributeError: a field of the wrong wire type (bytes where an int belongs).
        raise LmtoolError(f"{path}: not a SentencePiece model ({exc})") from None
    if not model.pieces or any(not p.text for p in model.pieces):
        raise LmtoolError(f"{path}: not a SentencePiece model (no pieces)")
    if not 0 <= model.unk_id < len(model.pieces) or model.pieces[model.unk_id].type != UNKNOWN:
        raise LmtoolError(f"{path}: not a SentencePiece model (no unknown piece at unk_id {model.unk_id})")
    return model


# --- conversion ----------------------------------------------------------------------------------


def bpe_merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged piece first."""
    ids = {p.text: i for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for merged_id, piece in enumerate(pieces):
        if piece.type != NORMAL:
            continue
        text = piece.text
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                # SentencePiece picks the highest-scoring merged piece; ids break ties the way
                # the piece list is ordered.
                ranked.append((-piece.score, merged_id, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _backend_model(model: SentencePieceModel, path: Path) -> models.Model:
    vocab = [p.text for p in model.pieces]
    unk = vocab[model.unk_id]
    if model.model_type == BPE:
        return models.BPE(
            vocab={text: i for i, text in enumerate(vocab)},
            merges=bpe_merges(model.pieces),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=model.byte_fallback,
        )
    if model.model_type == UNIGRAM:
        return models.Unigram(
            [(p.text, p.score) for p in model.pieces], unk_id=model.unk_id, byte_fallback=model.byte_fallback
        )
    name = MODEL_TYPE_NAMES.get(model.model_type, str(model.model_type))
    raise LmtoolError(f"{path}: SentencePiece '{name}' models are not supported (only bpe and unigram)")


def _normalizer(model: SentencePieceModel) -> normalizers.Normalizer | None:
    steps: list[normalizers.Normalizer] = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        # SentencePiece trims spaces at both ends and squeezes runs of them (spaces only, not
        # newlines or tabs).
        steps.append(normalizers.Replace(Regex("^ +| +$"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if model.escape_whitespaces and not model.add_dummy_prefix:
        steps.append(normalizers.Replace(" ", SPACE))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else normalizers.Sequence(steps)


def _pre_tokenizer(model: SentencePieceModel) -> pre_tokenizers.PreTokenizer | None:
    if model.escape_whitespaces and model.add_dummy_prefix:
        # One "▁" before the text (not after each added token), and spaces made visible;
        # split=False keeps the text one word, as SentencePiece sees it.
        return pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    return None


def _decoder(model: SentencePieceModel) -> decoders.Decoder:
    steps: list[decoders.Decoder] = []
    if model.escape_whitespaces:
        steps.append(decoders.Replace(SPACE, " "))
    if model.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # the dummy prefix
    return decoders.Sequence(steps)


def _added_tokens(model: SentencePieceModel, special_tokens: Collection[str]) -> list[AddedToken]:
    tokens = []
    for p in model.pieces:
        if p.type in (CONTROL, UNKNOWN):
            tokens.append(AddedToken(p.text, special=True, normalized=False))
        elif p.type == USER_DEFINED:
            tokens.append(AddedToken(p.text, special=p.text in special_tokens, normalized=False))
    return tokens


def sentencepiece_to_tokenizer(path: str | Path, special_tokens: Collection[str] = ()) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece model at path.

    special_tokens: user-defined pieces to mark special (Gemma's <start_of_turn>/<end_of_turn>),
    so that decoding with skip_special_tokens drops them.
    """
    path = Path(path)
    model = read_model(path)
    if model.treat_whitespace_as_suffix:
        raise LmtoolError(f"{path}: SentencePiece models with treat_whitespace_as_suffix are not supported")
    tokenizer = Tokenizer(_backend_model(model, path))
    normalizer = _normalizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    pre_tokenizer = _pre_tokenizer(model)
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = _decoder(model)
    tokenizer.add_tokens(_added_tokens(model, set(special_tokens)))
    return tokenizer
