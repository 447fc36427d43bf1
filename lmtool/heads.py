"""Task heads shared by every family, and the module that joins a backbone to one of them.

A backbone maps (input_ids, attention_mask, cache) to hidden states [B,T,D]. `TaskModel` puts it
under the family's prefix (`model.` for Gemma, `transformer.` for BLOOM) and a head under
transformers' name for that task, so state-dict keys match transformers' checkpoints both ways.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import ModelCache
from .registry import DEFAULT_HEAD_NAMES, TASKS  # noqa: F401  (torch-free, beside the class-name suffixes)


class CausalLMHead(nn.Module):
    """Projection to the vocabulary, optionally tied to the input embedding and soft-capped."""

    def __init__(self, hidden_size: int, vocab_size: int, soft_cap: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.soft_cap = soft_cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden, self.weight)
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits


def last_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor:
    """Index of each row's rightmost real token (works for left and right padding)."""
    T = input_ids.shape[1]
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), T - 1, device=input_ids.device)
    return (torch.arange(T, device=input_ids.device) * real).argmax(-1)


class TaskModel(nn.Module):
    """A backbone plus one task head. Calling it returns the task's logits:

    causal-lm [B,T,V]; sequence-classification [B,num_labels]; token-classification
    [B,T,num_labels]; question-answering a (start, end) pair of [B,T].
    """

    def __init__(self, family, config, task: str, backbone: nn.Module):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.family, self.config, self.task = family, config, task
        self.backbone_prefix = family.backbone_prefix
        self.head_name = family.head_name(task)
        setattr(self, self.backbone_prefix, backbone)
        D = config.hidden_size
        if task == "causal-lm":
            head = CausalLMHead(D, config.vocab_size, family.logits_soft_cap(config))
        elif task == "sequence-classification":
            head = nn.Linear(D, config.num_labels, bias=False)
        elif task == "token-classification":
            bias = config.extra.get("token_classification_bias", True)
            head = nn.Linear(D, config.num_labels, bias=bias)
        else:
            head = nn.Linear(D, 2, bias=True)
        setattr(self, self.head_name, head)
        self.tie_weights()

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.backbone_prefix)

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    @property
    def tied(self) -> bool:
        return self.task == "causal-lm" and self.config.tie_word_embeddings

    def tie_weights(self) -> None:
        if self.tied:
            self.head.weight = self.backbone.embed_tokens.weight

    def make_cache(self, batch: int, max_len: int) -> ModelCache:
        p = next(self.parameters())
        return self.backbone.make_cache(batch, max_len, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        logits_to_keep: int = 0,
    ):
        hidden = self.backbone(input_ids, attention_mask=attention_mask, cache=cache)
        if self.task == "causal-lm":
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return self.head(hidden)
        if self.task == "sequence-classification":
            index = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
            return self.head(pooled)
        if self.task == "token-classification":
            return self.head(hidden)
        start, end = self.head(hidden).split(1, dim=-1)
        return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as transformers saves it: tied copies left out."""
        state = self.state_dict()
        if self.tied:
            state.pop(f"{self.head_name}.weight", None)
        return state
