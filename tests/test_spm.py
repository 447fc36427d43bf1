"""SentencePiece tokenizer.model -> tokenizers, and the tokenizer files `lmtool convert` writes."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm
from fixtures_gemma import SAMPLE_TEXTS, corpus, train_tokenizer

from lmtool.convert import tokenizer_files
from lmtool.errors import LmtoolError
from lmtool.registry import get_family
from lmtool.spm import BPE, CONTROL, UNIGRAM, USER_DEFINED, read_model, sentencepiece_to_tokenizer
from lmtool.tokenizer import Tokenizer


def random_texts(count: int = 200, seed: int = 1) -> list[str]:
    """Snippets of the training corpus and random strings over a small alphabet with spaces,
    newlines, digits and characters the vocabulary lacks."""
    rng = random.Random(seed)
    lines = corpus(seed=7).split("\n")[:count]
    alphabet = "katori mona\n 12é中?!\t"
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]
    return lines + noise


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("gemma-spm"))


@pytest.fixture(scope="module")
def gemma_out(tmp_path_factory, gemma_model):
    """An output folder's tokenizer files, written from the bare tokenizer.model."""
    folder = tmp_path_factory.mktemp("gemma-out")
    for name, data in tokenizer_files(gemma_model, get_family("gemma")).items():
        (folder / name).write_bytes(data)
    return folder


def sp_ids(model_path, texts):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return [sp.encode(t) for t in texts]


# --- reading the .model ------------------------------------------------------------------------


def test_reads_the_model_fields_sentencepiece_reports(gemma_model):
    sp = spm.SentencePieceProcessor(model_file=str(gemma_model))
    model = read_model(gemma_model)
    assert len(model.pieces) == sp.get_piece_size() == 320
    assert [p.text for p in model.pieces] == [sp.id_to_piece(i) for i in range(320)]
    assert [p.score for p in model.pieces] == pytest.approx([sp.get_score(i) for i in range(320)])
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (3, 2, 1, 0)
    assert model.model_type == BPE and model.byte_fallback
    assert not model.add_dummy_prefix and not model.remove_extra_whitespaces and model.escape_whitespaces
    assert model.pieces[sp.piece_to_id("<start_of_turn>")].type == USER_DEFINED
    assert model.pieces[2].type == CONTROL
    assert model.special_tokens() == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def test_an_unset_id_is_left_out(tmp_path):
    import sentencepiece as sp_module

    sp_module.SentencePieceTrainer.train(
        input=str(_write(tmp_path / "c.txt", corpus())), model_prefix=str(tmp_path / "m"), vocab_size=300,
        model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1,
    )  # the defaults: pad_id -1, <s>, </s>
    model = read_model(tmp_path / "m.model")
    assert model.pad_id == -1
    assert model.special_tokens() == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "no pieces"),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "truncated varint"),
        (b'{"model": {"type": "BPE"}}', "not a SentencePiece model"),
        (bytes(range(256)) * 4, "not a SentencePiece model"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(LmtoolError) as err:
        sentencepiece_to_tokenizer(path)
    message = str(err.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(LmtoolError, match="no such file"):
        sentencepiece_to_tokenizer(tmp_path / "absent.model")


def test_word_models_are_refused(tmp_path):
    spm.SentencePieceTrainer.train(
        input=str(_write(tmp_path / "c.txt", corpus())), model_prefix=str(tmp_path / "w"), vocab_size=200,
        model_type="word", minloglevel=2, num_threads=1,
    )
    with pytest.raises(LmtoolError, match="'word' models are not supported"):
        sentencepiece_to_tokenizer(tmp_path / "w.model")


# --- encoding and decoding like sentencepiece ----------------------------------------------------


def test_gemma_style_bpe_gives_sentencepiece_ids(gemma_model):
    texts = SAMPLE_TEXTS + random_texts()
    tokenizer = sentencepiece_to_tokenizer(gemma_model)
    ours = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert ours == sp_ids(gemma_model, texts)
    # The cases that matter most: runs of spaces are pieces of their own, no dummy prefix,
    # non-ASCII goes to bytes, user-defined pieces are whole.
    sp = spm.SentencePieceProcessor(model_file=str(gemma_model))
    assert tokenizer.encode("é", add_special_tokens=False).tokens == ["<0xC3>", "<0xA9>"]
    assert tokenizer.encode("<end_of_turn>", add_special_tokens=False).ids == [sp.piece_to_id("<end_of_turn>")]
    assert tokenizer.encode("", add_special_tokens=False).ids == []


def test_decoding_matches_sentencepiece(gemma_model):
    sp = spm.SentencePieceProcessor(model_file=str(gemma_model))
    tokenizer = sentencepiece_to_tokenizer(gemma_model)
    for text in SAMPLE_TEXTS + random_texts(50):
        ids = sp.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == sp.decode(ids) == text


def test_control_pieces_are_special_and_user_defined_ones_only_when_named(gemma_model):
    plain = sentencepiece_to_tokenizer(gemma_model)
    named = sentencepiece_to_tokenizer(gemma_model, special_tokens=["<start_of_turn>"])
    ids = [2] + plain.encode("<start_of_turn>user\nhi", add_special_tokens=False).ids
    assert plain.decode(ids) == "<start_of_turn>user\nhi"  # like sentencepiece; <bos> is dropped
    assert named.decode(ids) == "user\nhi"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_dummy_prefix_models_give_sentencepiece_ids(tmp_path, model_type):
    """Llama/Mistral-style models: a "▁" is put before the text, and decoding removes it. (Texts
    that start with a space are the documented exception, as in transformers.)"""
    path = train_tokenizer(tmp_path, model_type=model_type, add_dummy_prefix=True)
    model = read_model(path)
    assert model.add_dummy_prefix and model.model_type == (UNIGRAM if model_type == "unigram" else BPE)
    texts = [t for t in SAMPLE_TEXTS + random_texts() if not t.startswith((" ", "<start_of_turn>"))]
    tokenizer = sentencepiece_to_tokenizer(path)
    assert [tokenizer.encode(t, add_special_tokens=False).ids for t in texts] == sp_ids(path, texts)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for text in texts[:60]:
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


# --- the output folder's tokenizer files ---------------------------------------------------------


def test_output_files_from_a_bare_model(gemma_out, gemma_model):
    assert sorted(p.name for p in gemma_out.iterdir()) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (gemma_out / "tokenizer.model").read_bytes() == gemma_model.read_bytes()
    config = json.loads((gemma_out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GemmaTokenizer" and config["add_bos_token"] is True
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert config["mask_token"] is None  # not in this vocabulary: transformers must not append it


def test_transformers_sentencepiece_and_lmtool_agree_on_the_output(gemma_out):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(gemma_out)
    ours = Tokenizer.from_folder(gemma_out, family=get_family("gemma"))
    sp = spm.SentencePieceProcessor(model_file=str(gemma_out / "tokenizer.model"))
    assert len(hf) == sp.get_piece_size()  # no token appended
    for text in SAMPLE_TEXTS + random_texts(100):
        expected = [sp.bos_id()] + sp.encode(text)  # BOS by default
        assert hf(text)["input_ids"] == expected, text
        assert ours.encode(text) == expected, text
    assert hf.padding_side == "left"
    turn = hf("<start_of_turn>user\nhi<end_of_turn>")["input_ids"]
    assert hf.decode(turn, skip_special_tokens=True) == "user\nhi"


def test_the_raw_tokenizer_json_adds_bos_too(gemma_out):
    """Tools that read tokenizer.json alone (not tokenizer_config.json) also get the BOS."""
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer.from_file(str(gemma_out / "tokenizer.json"))
    assert raw.encode("katori").ids[0] == 2
    assert raw.encode("katori", add_special_tokens=False).ids[0] != 2


def test_a_folder_with_its_own_tokenizer_config_wins(tmp_path, gemma_out):
    folder = tmp_path / "given"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((gemma_out / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"padding_side": "right", "add_bos_token": False, "model_max_length": 64}))
    files = tokenizer_files(folder, get_family("gemma"))
    assert sorted(files) == ["tokenizer.json", "tokenizer_config.json"]  # no .model to copy
    assert files["tokenizer.json"] == (gemma_out / "tokenizer.json").read_bytes()
    config = json.loads(files["tokenizer_config.json"])
    assert config["padding_side"] == "right" and config["add_bos_token"] is False and config["model_max_length"] == 64
    assert config["tokenizer_class"] == "GemmaTokenizer"  # the family's default stays


def test_a_tokenizer_json_file_alone(gemma_out):
    files = tokenizer_files(gemma_out / "tokenizer.json", get_family("gemma"))
    assert sorted(files) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("absent", None, "no such tokenizer file or folder"),
        ("vocab.txt", b"a\nb\n", "expected a folder, a tokenizer.json or a SentencePiece .model file"),
        ("tokenizer.json", b"{not json", "cannot load tokenizer"),
        ("empty-folder", "dir", "no tokenizer.json or tokenizer.model"),
    ],
)
def test_bad_tokenizer_paths_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(LmtoolError) as err:
        tokenizer_files(path, get_family("gemma"))
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_lmtool_reads_a_folder_with_only_the_model(tmp_path, gemma_model):
    (tmp_path / "tokenizer.model").write_bytes(gemma_model.read_bytes())
    family = get_family("gemma")
    ours = Tokenizer.from_folder(tmp_path, family=family, config=family.config_class())  # BOS id 2 from the config
    sp = spm.SentencePieceProcessor(model_file=str(gemma_model))
    for text in SAMPLE_TEXTS:
        assert ours.encode(text) == [2] + sp.encode(text)
        assert ours.decode(ours.encode(text)) == text
