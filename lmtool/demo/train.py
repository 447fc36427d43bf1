"""Train the demo checkpoint shipped in lmtool/demo/zen-gemma: a 0.1M-parameter Gemma that has
learned The Zen of Python (PEP 20, public domain, from Python's own `this` module).

It is small enough to ship and to train in about a minute on two CPU cores, and trained rather
than random, so `lmtool generate` prints real text on a fresh machine with no download:

    python -m lmtool.demo.train lmtool/demo/zen-gemma --force
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import random
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from ..checkpoint import PlannedTensor, atomic_folder, write_weights
from ..convert import tokenizer_files
from ..families.gemma import FAMILY
from ..families.gemma.config import GemmaConfig
from ..loading import build_model
from ..tokenizer import pad_sequences

SPECIALS = ["<start_of_turn>", "<end_of_turn>"]


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the poem on first import
    return codecs.decode(this.s, "rot13")


def train_tokenizer(text: str, folder: Path) -> Path:
    corpus = folder / "zen.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=SPECIALS,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, minloglevel=2,
    )
    return folder / "tokenizer.model"


def training_windows(ids_per_line: list[list[int]], bos: int, eos: int, width: int) -> list[list[int]]:
    """Every line as a possible start: BOS, then the poem from that line on, EOS at the end."""
    windows = []
    for start in range(len(ids_per_line)):
        ids = [bos] + [t for line in ids_per_line[start:] for t in line] + [eos]
        windows.append(ids[: width + 1])
    return windows


def train(out: Path, steps: int, seed: int, force: bool) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    text = zen_of_python().strip() + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        model_path = train_tokenizer(text, Path(tmp))
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
        files = tokenizer_files(model_path, FAMILY)
    lines = [line + "\n" for line in text.splitlines()]
    config = GemmaConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        architectures=["GemmaForCausalLM"], dtype="float32",
    )
    model = build_model(FAMILY, config, "causal-lm")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    windows = training_windows([sp.encode(line) for line in lines], bos=2, eos=1, width=96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        batch = random.choices(windows, k=16)
        ids, mask = pad_sequences(batch, pad_id=0, side="right")
        logits = model(ids[:, :-1], attention_mask=mask[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        loss = (loss * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    state = model.checkpoint_state_dict()
    tensors = [PlannedTensor(k, tuple(v.shape), v.dtype, lambda v=v: v.detach()) for k, v in state.items()]
    with atomic_folder(out, force=force) as tmp_out:
        write_weights(tmp_out, tensors)
        (tmp_out / "config.json").write_text(config.to_json())
        generation = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "do_sample": False}
        (tmp_out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, data in files.items():
            (tmp_out / name).write_bytes(data)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    train(args.out, args.steps, args.seed, args.force)


if __name__ == "__main__":
    main()
