"""Text generation: sampling, a prefill-then-decode loop over a preallocated cache, stop strings.

The loop is deliberately small: a prefill over the left-padded prompts (in chunks when long),
then one call per new token with only that token as input. Everything a step does not need (logits of earlier
positions, attention masks of decode steps) is left out, so the per-token cost is the model's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import LmtoolError
from .heads import TaskModel
from .tokenizer import Tokenizer, pad_sequences


# Prompt tokens per prefill call.
PREFILL_CHUNK = 1024


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row: divide positive logits, multiply
    negative ones (what transformers and llama.cpp do)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits [B,V] with filtered tokens at -inf, in transformers' order: repetition
    penalty, temperature, top-k, top-p, min-p."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the mass above it already reaches top_p; the best token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * params.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | list[torch.Generator] | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B,V] -> next token ids [B]."""
    if params.greedy and (seen is None or params.repetition_penalty == 1.0):
        # Casting to float32 cannot change the argmax, so skip that copy of B x vocab logits; and
        # max(-1) rather than argmax: bfloat16 argmax is 5x slower on CPU. Both take the first
        # of equal maxima.
        return logits.max(-1).indices
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if isinstance(generator, list):  # a generator per row: each row's draws do not depend on its batch
        return torch.cat([torch.multinomial(probs[row : row + 1], 1, generator=g) for row, g in enumerate(generator)])[:, 0]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStream:
    """Turns one row's generated ids into text deltas safe to print.

    Decodes a sliding window of ids so multi-byte characters split across tokens come out whole,
    and holds back any tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # decoded but not yet emitted
        self.text = ""  # emitted so far
        self.stopped = False

    def _decode_new(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def add(self, token_id: int) -> str:
        """Add a token; return the text that can be shown now. Sets .stopped on a stop string."""
        self.ids.append(token_id)
        self.pending += self._decode_new()
        return self._release()

    def _release(self, final: bool = False) -> str:
        window = self.text[-max((len(s) for s in self.stop), default=0):] + self.pending if self.stop else ""
        for s in self.stop:
            hit = window.find(s)
            if hit >= 0:
                # The stop string may begin in text already emitted; emit nothing more.
                cut = max(hit - (len(window) - len(self.pending)), 0)
                out, self.pending, self.stopped = self.pending[:cut], "", True
                self.text += out
                return out
        keep = 0 if final else self._stop_prefix_len(self.pending)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-n:]):
                    best = max(best, n)
                    break
        return best

    def flush(self) -> str:
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.ids[self.prefix_offset :])
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        self.pending += tail[len(before) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos", "stop" (a stop string) or "length"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0  # from the start of the call to the first sampled token
    new_tokens: int = 0


def context_window(config) -> int | None:
    """Positions the model was trained for (Gemma's and Zamba2's rotary attention); None where
    there is no limit (BLOOM's ALiBi, RecurrentGemma's recurrence and sliding window)."""
    return getattr(config, "max_positions", None) or getattr(config, "max_position_embeddings", None)


def tokens_within_window(prompt_tokens: int, max_new_tokens: int, window: int | None) -> int:
    """How many new tokens fit after a prompt of prompt_tokens: past the window a model's output
    is garbage, so a prompt that fills it is refused (as llama-cli does) and -n is cut to fit."""
    if window is None:
        return max_new_tokens
    if prompt_tokens >= window:
        raise LmtoolError(
            f"the prompt is {prompt_tokens} tokens; the model's context window is {window} "
            "(max_position_embeddings), which leaves no room to generate"
        )
    return min(max_new_tokens, window - prompt_tokens)


@torch.inference_mode()
def generate(
    model: TaskModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    seed: int | list[int],
    eos_ids: list[int],
    pad_id: int = 0,
    tokenizer: Tokenizer | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    stats: GenerationStats | None = None,
) -> tuple[list[Completion], GenerationStats]:
    """Generate for a batch of tokenized prompts (left-padded together).

    on_text(row, delta) is called as text becomes printable (needs a tokenizer). A row stops at an
    EOS id (unless ignore_eos), at a stop string, or after max_new_tokens. Prompts longer than
    prefill_chunk tokens are prefilled in chunks of that many. `stats`, when given, is filled as
    the loop goes, so a caller that is interrupted still knows how far it got. A list of seeds,
    one per prompt, samples each row on its own generator, so a row's text does not depend on
    the other prompts of its batch (up to the rounding that padding can change).
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    B = len(prompts)
    input_ids, mask = pad_sequences(prompts, pad_id, side="left")
    width = input_ids.shape[1]
    input_ids, mask = input_ids.to(device), mask.to(device)
    padded = bool((mask == 0).any())

    if isinstance(seed, list):
        generator = [torch.Generator(device=device).manual_seed(s) for s in seed]
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
    completions = [Completion(prompt_tokens=len(p)) for p in prompts]
    streams = [TextStream(tokenizer, stop or []) for _ in prompts] if tokenizer else None
    seen = None
    if params.repetition_penalty != 1.0:
        vocab = model.config.vocab_size
        seen = torch.zeros((B, vocab), dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.clamp(max=vocab - 1), mask.bool())
    eos = torch.tensor(eos_ids if not ignore_eos else [], dtype=torch.long, device=device)
    stats = stats if stats is not None else GenerationStats()

    cache = model.make_cache(B, width + max_new_tokens)
    # Long prompts go in chunks, each continuing the cache: prefill memory is bounded by the
    # chunk (for the recurrent families, whose state is constant, by nothing else).
    for begin in range(0, width, prefill_chunk):
        chunk = slice(begin, begin + prefill_chunk)
        chunk_mask = mask[:, chunk] if padded else None
        logits = model(input_ids[:, chunk], attention_mask=chunk_mask, cache=cache, logits_to_keep=1)[:, -1]
    stats.prefill_s = time.perf_counter() - t0
    active = [True] * B
    t_decode = time.perf_counter()
    for step in range(max_new_tokens):
        next_ids = sample(logits, params, generator, seen)
        if seen is not None:
            seen[torch.arange(B, device=device), next_ids] = True
        is_eos = torch.isin(next_ids, eos).tolist() if eos.numel() else [False] * B
        ids = next_ids.tolist()
        if step == 0:
            stats.first_token_s = time.perf_counter() - t0
        for row in range(B):
            if not active[row]:
                continue
            done = completions[row]
            if is_eos[row]:
                done.finish_reason, active[row] = "eos", False
                continue
            done.token_ids.append(ids[row])
            stats.new_tokens += 1
            if streams:
                delta = streams[row].add(ids[row])
                if delta and on_text:
                    on_text(row, delta)
                if streams[row].stopped:
                    done.finish_reason, active[row] = "stop", False
        if not any(active) or step == max_new_tokens - 1:
            break
        logits = model(next_ids[:, None], cache=cache, logits_to_keep=1)[:, -1]
    stats.decode_s = time.perf_counter() - t_decode
    for row, done in enumerate(completions):
        if done.finish_reason is None:
            done.finish_reason = "length"
        if streams:
            tail = streams[row].flush()
            if tail and on_text:
                on_text(row, tail)
            done.text = streams[row].text
    return completions, stats
