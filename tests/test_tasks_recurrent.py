"""classify, tag and qa on the recurrent families' heads (transformers has no pipelines for
them): texts of different lengths, several attention windows long, batched with padding give the
records they give one at a time, and a classification equals the argmax of the model's logits."""

from __future__ import annotations

import json

import pytest
import torch

import lmtool
from helpers import generic_head_classes, name_architecture, randomize, run_cli
from test_tasks_fixtures import CLASS_LABELS, NER_LABELS, _hf_tokenizer

TEXTS = [
    "Sarah is from Berlin and works for Acme Corporation.",
    "Wolfgang works for Acme in Berlin.",
    "Clara and Jean visited Berlin last summer, and Sarah lives in Berlin, Germany.",
]
COMMANDS = {"sequence-classification": "classify", "token-classification": "tag", "question-answering": "qa"}


def head_classes(family: str) -> dict:
    if family == "recurrent_gemma":
        from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaPreTrainedModel

        return generic_head_classes(RecurrentGemmaPreTrainedModel)
    from transformers import Zamba2ForSequenceClassification
    from transformers.models.zamba2.modeling_zamba2 import Zamba2PreTrainedModel

    return generic_head_classes(Zamba2PreTrainedModel, {"sequence-classification": Zamba2ForSequenceClassification})


def config(family: str, vocab: int, labels: dict):
    if family == "recurrent_gemma":
        from transformers import RecurrentGemmaConfig

        return RecurrentGemmaConfig(
            vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, attention_window_size=8, pad_token_id=0, bos_token_id=2, eos_token_id=1,
            id2label=labels,
        )
    from transformers import Zamba2Config

    return Zamba2Config(
        vocab_size=vocab, hidden_size=20, intermediate_size=36, num_attention_heads=4, mamba_d_state=6,
        mamba_d_conv=4, n_mamba_heads=10, chunk_size=5, adapter_rank=5, num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], num_mem_blocks=1,
        use_shared_attention_adapter=True, pad_token_id=0, bos_token_id=2, eos_token_id=1, id2label=labels,
    )


def checkpoint(folder, family: str, task: str):
    tok = _hf_tokenizer("spm")
    labels = CLASS_LABELS if task == "sequence-classification" else NER_LABELS
    torch.manual_seed(5)
    cls = head_classes(family)[task]
    model = randomize(cls(config(family, len(tok), labels)), std=0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    name_architecture(folder, "RecurrentGemma" if family == "recurrent_gemma" else "Zamba2", task)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def close(a, b, tol=1e-4) -> bool:
    """Equal records up to float rounding in scores."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


@pytest.mark.parametrize("family", ["recurrent_gemma", "zamba2"])
@pytest.mark.parametrize("task", list(COMMANDS))
def test_task_commands_run_and_batching_changes_nothing(tmp_path, capsys, family, task):
    command = COMMANDS[task]
    folder = checkpoint(tmp_path / "model", family, task)
    extra = ["--question", "Who works for Acme?"] if command == "qa" else []
    code, batched, err = run_cli(capsys, command, str(folder), *TEXTS, *extra, "--json", "--batch-size", "3")
    assert code == 0, err
    records = [json.loads(line) for line in batched.splitlines()]
    assert len(records) == len(TEXTS)
    for text, record in zip(TEXTS, records):
        code, alone, err = run_cli(capsys, command, str(folder), text, *extra, "--json", "--batch-size", "1")
        assert code == 0, err
        alone_record = json.loads(alone)
        record.pop("id", None), alone_record.pop("id", None)
        assert close(record, alone_record)
    if command == "classify":
        lm = lmtool.load(folder, dtype="float32")
        with torch.no_grad():
            logits = lm.model(torch.tensor([lm.tokenizer.encode(TEXTS[0])]))[0]
        assert records[0]["label"] == lm.config.labels[int(logits.argmax())]
