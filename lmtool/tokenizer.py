"""Tokenizers: one wrapper over a `tokenizers.Tokenizer`, whatever the checkpoint ships.

tokenizer.json is loaded directly; a SentencePiece tokenizer.model is converted in memory to the
same kind of object (lmtool.spm), so there is one code path with character offsets for tag and qa.
Special tokens are added by this wrapper, not by the file's post-processor, following
tokenizer_config.json (add_bos_token, add_eos_token) with the family's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from .errors import LmtoolError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmtoolError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def pad_sequences(sequences: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into input_ids and attention_mask tensors [B, max_len]."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


@dataclass
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the text; (0, 0) for specials
    special: list[bool]


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_id: int | None,
        eos_ids: list[int],
        pad_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        padding_side: str = "left",
        chat_format=None,
        source: str = "tokenizer",
    ):
        self.backend = backend
        self.bos_id, self.eos_ids, self.pad_id = bos_id, eos_ids, pad_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.padding_side = padding_side
        self.chat_format = chat_format
        self.source = source

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, family=None, config=None) -> "Tokenizer":
        folder = Path(folder)
        defaults: dict = {}
        if (folder / "tokenizer.json").is_file():
            try:
                backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as exc:  # tokenizers raises a bare Exception on bad files
                raise LmtoolError(f"{folder / 'tokenizer.json'}: cannot load tokenizer ({exc})") from None
            source = str(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            from .spm import read_model, sentencepiece_to_tokenizer

            backend = sentencepiece_to_tokenizer(folder / "tokenizer.model")
            # The special tokens the SentencePiece model was trained with, unless the files say otherwise.
            defaults = read_model(folder / "tokenizer.model").special_tokens()
            source = str(folder / "tokenizer.model")
        else:
            raise LmtoolError(f"{folder}: no tokenizer.json or tokenizer.model")
        settings = {
            **defaults,
            **_read_json(folder / "special_tokens_map.json"),
            **_read_json(folder / "tokenizer_config.json"),
        }
        return cls.from_backend(backend, settings, family=family, config=config, source=source)

    @classmethod
    def from_backend(cls, backend: HFTokenizer, settings: dict, family=None, config=None, source="tokenizer"):
        def token_id(key: str, fallback: int | None) -> int | None:
            text = _token_text(settings.get(key))
            if text is not None and backend.token_to_id(text) is not None:
                return backend.token_to_id(text)
            return fallback

        bos = token_id("bos_token", getattr(config, "bos_token_id", None))
        eos = token_id("eos_token", None)
        eos_ids = [eos] if eos is not None else list(getattr(config, "eos_token_ids", []) or [])
        if config is not None:
            eos_ids += [e for e in config.eos_token_ids if e not in eos_ids]
        pad = token_id("pad_token", getattr(config, "pad_token_id", None))
        add_bos = settings.get("add_bos_token", family.add_bos_token if family else False)
        add_eos = settings.get("add_eos_token", family.add_eos_token if family else False)
        side = settings.get("padding_side", family.padding_side if family else "left")
        return cls(
            backend,
            bos_id=bos,
            eos_ids=eos_ids,
            pad_id=pad,
            add_bos=bool(add_bos) and bos is not None,
            add_eos=bool(add_eos) and bool(eos_ids),
            padding_side=side if side in ("left", "right") else "left",
            chat_format=family.chat_format if family else None,
            source=source,
        )

    # --- encoding --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _wrap(self, ids: list[int], add_special_tokens: bool) -> tuple[list[int], int, int]:
        front = [self.bos_id] if add_special_tokens and self.add_bos else []
        back = [self.eos_ids[0]] if add_special_tokens and self.add_eos else []
        return front + ids + back, len(front), len(back)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_special_tokens)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> Encoding:
        enc = self.backend.encode(text, add_special_tokens=False)
        ids, front, back = self._wrap(enc.ids, add_special_tokens)
        offsets = [(0, 0)] * front + [tuple(o) for o in enc.offsets] + [(0, 0)] * back
        special = [True] * front + [bool(s) for s in enc.special_tokens_mask] + [True] * back
        return Encoding(ids, offsets, special)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def pad(
        self, sequences: list[list[int]], side: str | None = None, pad_id: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists into input_ids and attention_mask tensors [B, max_len]."""
        pad = pad_id if pad_id is not None else (self.pad_id if self.pad_id is not None else 0)
        return pad_sequences(sequences, pad, side or self.padding_side)

    def batch_encode(self, texts: list[str], side: str | None = None, add_special_tokens: bool = True):
        return self.pad([self.encode(t, add_special_tokens) for t in texts], side=side)

    # --- chat --------------------------------------------------------------------------------
    def apply_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_format is None:
            raise LmtoolError(f"{self.source}: this model family has no chat format")
        return self.chat_format(messages)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "vocab_size": self.vocab_size,
            "model": type(self.backend.model).__name__,
            "bos": self.bos_id,
            "eos": self.eos_ids,
            "pad": self.pad_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }
