"""Print lmtool-vs-transformers parity figures (max |Δlogit| at real tokens) on tiny random models.

    HF_HUB_OFFLINE=1 python benchmarks/parity.py

The tests assert the bounds; this script reports the measured values, for release notes.
RecurrentGemma is compared with transformers within the attention window and with the authors'
model (the `recurrentgemma` package) past it, where transformers attends to one key fewer.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lmtool  # noqa: E402
from helpers import randomize  # noqa: E402

FAMILIES = {
    "gemma": (
        tf.GemmaConfig,
        dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             pad_token_id=0, eos_token_id=1, bos_token_id=2),
        {"mha": dict(num_key_value_heads=4, head_dim=8), "mqa": dict(num_key_value_heads=1, head_dim=16),
         "gqa, head_dim 12": dict(num_key_value_heads=2, head_dim=12)},
        {"causal-lm": tf.GemmaForCausalLM, "sequence-classification": tf.GemmaForSequenceClassification,
         "token-classification": tf.GemmaForTokenClassification},
    ),
    "bloom": (
        tf.BloomConfig,
        dict(vocab_size=120, hidden_size=48, n_layer=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        {"4 heads": dict(n_head=4), "6 heads (not a power of 2)": dict(n_head=6)},
        {"causal-lm": tf.BloomForCausalLM, "sequence-classification": tf.BloomForSequenceClassification,
         "token-classification": tf.BloomForTokenClassification,
         "question-answering": tf.BloomForQuestionAnswering},
    ),
}


def logits_of(output, task):
    if task == "question-answering":
        return torch.stack([output.start_logits, output.end_logits], -1) if hasattr(output, "start_logits") \
            else torch.stack(output, -1)
    return output.logits if hasattr(output, "logits") else output


def measure(family: str) -> None:
    config_cls, base, shapes, heads = FAMILIES[family]
    torch.manual_seed(0)
    ids = torch.randint(3, 120, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    real = mask.bool()
    for shape, extra in shapes.items():
        for task, cls in heads.items():
            config = config_cls(**base, **extra, id2label={0: "a", 1: "b", 2: "c"})
            hf = randomize(cls(config))
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(tmp)
                lm = lmtool.load(tmp, dtype="float32")
                with torch.no_grad():
                    ours = logits_of(lm.model(ids, attention_mask=mask), task)
                    theirs = logits_of(hf(ids, attention_mask=mask), task)
                    if ours.dim() >= 2 and ours.shape[:2] == real.shape:
                        ours, theirs = ours[real], theirs[real]
                    padded = (ours - theirs).abs().max().item()
                    alone = lm.model(ids[2:, 7:])
                    alone = logits_of(alone, task)
                    row = logits_of(lm.model(ids, attention_mask=mask), task)[2:]
                    if task in ("causal-lm", "token-classification", "question-answering"):
                        row = row[:, 7:]
                    vs_alone = (alone - row).abs().max().item()
            print(f"{family:6s} {shape:28s} {task:24s} padded batch vs transformers {padded:.1e}   "
                  f"padded row vs alone {vs_alone:.1e}")


def measure_recurrent_gemma() -> None:
    from griffin_oracle import griffin_from_hf, griffin_logits
    from helpers import padded_batch

    window = 8
    base = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_attention_heads=4, lru_width=48,
                attention_window_size=window, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    shapes = {
        "mqa, conv 4, 5 layers": dict(num_key_value_heads=1, conv1d_width=4, num_hidden_layers=5),
        "gqa, conv 3, (A, R)": dict(num_key_value_heads=2, conv1d_width=3, num_hidden_layers=4,
                                    block_types=["attention", "recurrent"]),
    }
    for shape, extra in shapes.items():
        torch.manual_seed(0)
        hf = randomize(tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(**base, **extra)))
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            lm = lmtool.load(tmp, dtype="float32")
        ids, mask = padded_batch(120, (3 * window + 2, 2 * window, 5))
        real = mask.bool()
        with torch.no_grad():
            full = lm.model(ids, attention_mask=mask)
            within = (lm.model(ids[:, :window]) - hf(ids[:, :window], use_cache=False).logits).abs().max().item()
            figures = {"transformers, within the window": within}
            if extra["num_key_value_heads"] == 1:  # the authors' attention is MQA only
                authors = griffin_logits(griffin_from_hf(hf), ids, mask)
                figures["authors, 3 windows, padded batch"] = (full - authors)[real].abs().max().item()
            alone = lm.model(ids[2:, real[2]])
            figures["padded row vs alone"] = (alone[0] - full[2, real[2]]).abs().max().item()
            cache = lm.model.make_cache(3, ids.shape[1])
            pieces, start = [], 0
            for n in (5, 7, 3, 1, 1, 9):
                pieces.append(lm.model(ids[:, start : start + n], attention_mask=mask[:, start : start + n], cache=cache))
                start += n
            chunked = torch.cat(pieces, dim=1)
            figures["chunked prefill + decode vs one-shot"] = (chunked - full)[real].abs().max().item()
        print("recurrent_gemma " + shape + ": " + ", ".join(f"{k} {v:.1e}" for k, v in figures.items()))


if __name__ == "__main__":
    for name in FAMILIES:
        measure(name)
    measure_recurrent_gemma()
