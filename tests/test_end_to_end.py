"""The path a user takes: an original gemma_pytorch checkpoint, `lmtool convert`, `lmtool generate`."""

from __future__ import annotations

import json

import torch


from helpers import run_cli
from fixtures_gemma import gemma_pytorch_state_dict, save_ckpt, tiny_gemma, train_tokenizer


def test_convert_then_generate_matches_the_source_model(capsys, tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tok")
    source = tiny_gemma(vocab_size=320, heads=4, kv_heads=1)
    ckpt = save_ckpt(gemma_pytorch_state_dict(source), tmp_path / "gemma-tiny.ckpt")

    code, out, err = run_cli(capsys, "inspect", str(ckpt), "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "gemma-pytorch"

    code, out, err = run_cli(capsys, "convert", str(ckpt), str(tmp_path / "hf"), "--tokenizer", str(tokenizer))
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hf")  # the result on stdout; the report on stderr

    code, out, err = run_cli(capsys, "generate", str(tmp_path / "hf"), "katori mona", "--temperature", "0",
                         "-n", "16", "--json", "--ignore-eos")
    assert code == 0, err
    record = json.loads(out)
    import sentencepiece as spm

    prompt = [2] + spm.SentencePieceProcessor(model_file=str(tokenizer)).encode("katori mona")
    with torch.no_grad():
        expected = source.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt):].tolist()
    assert record["prompt_tokens"] == len(prompt)
    assert record["token_ids"] == expected
