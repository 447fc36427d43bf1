"""Tiny task checkpoints for the classify/tag/qa tests, built offline, plus checks that the
tokenizers really have the properties the offset tests rely on.

Two tokenizers are trained on a small corpus:
- "spm": SentencePiece-style BPE (spaces become "▁" and stay attached to the next word, byte
  fallback for characters outside the vocabulary), as Gemma ships;
- "bytes": byte-level BPE ("Ġ" for a leading space, characters split into UTF-8 bytes), as BLOOM
  ships, with offsets that include the leading space.
Models are transformers' own classes with random weights, saved with save_pretrained, so
transformers is the oracle for every forward pass.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "My name is Wolfgang and I live in Berlin.",
    "Sarah works for Acme Corporation in New York City since 2019.",
    "The meeting with Dr. Müller is in Zürich, near the Großmünster.",
    "Tokyo is called 東京 and Beijing is 北京; café naïve façade.",
    "Question: where does Wolfgang live? Answer: in Berlin, Germany.",
    "Clara and Jean-Pierre visited São Paulo and Kraków last summer.",
]
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "MISC"}
CLASS_LABELS = {0: "negative", 1: "neutral", 2: "positive"}

_ROOT = Path(tempfile.mkdtemp(prefix="lmtool-tasks-"))
atexit.register(shutil.rmtree, _ROOT, True)


def _train(tok: Tokenizer, trainer) -> Tokenizer:
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


def spm_tokenizer() -> Tokenizer:
    """Gemma-like: <pad>=0 <eos>=1 <bos>=2 <unk>=3, "▁" word prefix, byte fallback, BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    ascii_only = sorted({c for line in CORPUS for c in line.replace(" ", "▁") if ord(c) < 128} | {"▁"})
    _train(tok, trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=ascii_only, limit_alphabet=len(ascii_only), show_progress=False,
    ))
    # Byte-fallback pieces <0x00>..<0xFF>, as SentencePiece vocabularies have them.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    return tok


def byte_tokenizer() -> Tokenizer:
    """BLOOM-like: <unk>=0 <s>=1 </s>=2 <pad>=3, byte-level BPE, nothing added, offsets keep spaces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(tok, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _hf_tokenizer(kind: str):
    from transformers import PreTrainedTokenizerFast

    if kind == "spm":
        return PreTrainedTokenizerFast(
            tokenizer_object=spm_tokenizer(), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
            unk_token="<unk>", padding_side="right",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer(), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", padding_side="right",
    )


def _config(family: str, vocab_size: int, **extra):
    from transformers import BloomConfig, GemmaConfig

    if family == "gemma":
        return GemmaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            initializer_range=0.3, pad_token_id=0, bos_token_id=2, eos_token_id=1, **extra,
        )
    return BloomConfig(
        vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3,
        pad_token_id=3, bos_token_id=1, eos_token_id=2, **extra,
    )


HEAD_CLASSES = {
    ("gemma", "sequence-classification"): "GemmaForSequenceClassification",
    ("gemma", "token-classification"): "GemmaForTokenClassification",
    ("bloom", "sequence-classification"): "BloomForSequenceClassification",
    ("bloom", "token-classification"): "BloomForTokenClassification",
    ("bloom", "question-answering"): "BloomForQuestionAnswering",
}


@functools.cache
def checkpoint(family: str, task: str, labels: str = "ner", problem_type: str | None = None,
               seed: int = 0, max_length: int | None = None) -> Path:
    """A saved tiny model: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.

    labels: "ner", "classes", "one" (a single output), "none" (no id2label: transformers' two)."""
    import transformers

    kind = "spm" if family == "gemma" else "bytes"
    hf_tok = _hf_tokenizer(kind)
    id2label = {"ner": NER_LABELS, "classes": CLASS_LABELS, "one": {0: "value"}, "none": None}[labels]
    extra = {"id2label": id2label} if id2label else {}
    if problem_type:
        extra["problem_type"] = problem_type
    torch.manual_seed(seed)
    model = getattr(transformers, HEAD_CLASSES[(family, task)])(_config(family, len(hf_tok), **extra))
    model.eval()
    name = f"{family}-{task}-{labels}-{problem_type}-{seed}-{max_length}"
    folder = _ROOT / name
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    # lmtool adds BOS itself (as Gemma's tokenizer does); BLOOM adds nothing.
    settings["add_bos_token"] = family == "gemma"
    if max_length:
        settings["model_max_length"] = max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def hf_model(folder: Path):
    import transformers

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def hf_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def bloom_available() -> bool:
    from lmtool.registry import families

    return "bloom" in families()


needs_bloom = pytest.mark.skipif(not bloom_available(), reason="the BLOOM family is not registered yet")


# --- the tokenizers have the properties the offset tests are about -----------------------------


def test_spm_offsets_include_the_leading_space_and_bytes_fall_back():
    text = "in Berlin 東京"
    enc = spm_tokenizer().encode(text, add_special_tokens=False)
    assert "▁Berlin" in enc.tokens and text[slice(*enc.offsets[enc.tokens.index("▁Berlin")])] == " Berlin"
    pieces = [o for t, o in zip(enc.tokens, enc.offsets) if t.startswith("<0x")]
    assert len(pieces) == 6  # two CJK characters, three UTF-8 bytes each
    assert pieces[0] == pieces[1] == pieces[2] == (10, 11)  # three pieces, one character


def test_byte_level_offsets_include_the_leading_space_and_split_characters():
    text = "in Berlin 東京"
    enc = byte_tokenizer().encode(text, add_special_tokens=False)
    assert "ĠBerlin" in enc.tokens and text[slice(*enc.offsets[enc.tokens.index("ĠBerlin")])] == " Berlin"
    assert any(b[0] < a[1] for a, b in zip(enc.offsets, enc.offsets[1:]))  # a character split across tokens
