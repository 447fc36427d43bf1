"""Source against quantized model on one text, as llama.cpp's `llama-perplexity --kl-divergence`
defines its statistics, over the full vocabulary in float64.

The text is tokenized once and cut into chunks of `chunk` tokens, each starting with BOS; in each
chunk the positions from chunk/2 to the second-to-last are scored (they predict a token of the
chunk and have at least half a chunk of context), as llama.cpp does. Per scored position, with
p/lp the reference's probabilities/log-probabilities and q/lq the quantized model's:
- KLD = sum_v p(v) (lp(v) - lq(v))
- same top-1: argmax of both logits agree
- NLL of the next token under each model; Δp = q(next) - p(next)
Reported: KLD mean (± its standard error), median, p99, max; same-top-1 % (± sqrt(p(1-p)/(n-1)));
mean and RMS Δp (in %); both perplexities and their ratio exp(mean(NLL_q - NLL_p)) with the
uncertainty of that mean difference carried through exp (llama.cpp's ln(PPL(Q)/PPL(base)) ± ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import LmtoolError

MAX_CHUNK = 512
MAX_CHUNKS = 16
ROW_BLOCK = 64  # positions whose full-vocabulary float64 log-probs are held at once


def chunks_of(ids: list[int], chunk: int, bos: int | None) -> list[list[int]]:
    body = chunk - (1 if bos is not None else 0)
    pieces = [ids[i : i + body] for i in range(0, len(ids), body)]
    pieces = [p for p in pieces if len(p) >= 4][:MAX_CHUNKS]
    return [([bos] if bos is not None else []) + p for p in pieces]


def position_stats(ref_logits: torch.Tensor, q_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics for logits [N, V] of both models and the next tokens [N]."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("kld", "same_top", "nll_ref", "nll_q", "delta_p")}
    for start in range(0, targets.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        lp = torch.log_softmax(ref_logits[rows].to(torch.float64), dim=-1)
        lq = torch.log_softmax(q_logits[rows].to(torch.float64), dim=-1)
        t = targets[rows].unsqueeze(1)
        p = lp.exp()
        out["kld"].append((p * (lp - lq)).sum(-1).clamp_(min=0))
        out["same_top"].append(ref_logits[rows].argmax(-1) == q_logits[rows].argmax(-1))
        out["nll_ref"].append(-lp.gather(1, t).squeeze(1))
        out["nll_q"].append(-lq.gather(1, t).squeeze(1))
        out["delta_p"].append(lq.gather(1, t).exp().squeeze(1) - p.gather(1, t).squeeze(1))
    return {k: torch.cat(v) for k, v in out.items()}


def summarize(stats: dict[str, torch.Tensor], max_kld: float, min_top1: float) -> dict[str, Any]:
    n = stats["kld"].numel()
    kld = stats["kld"]
    top = stats["same_top"].to(torch.float64).mean().item()
    diff = stats["nll_q"] - stats["nll_ref"]
    ln_ratio = diff.mean().item()
    ln_ratio_err = diff.std().item() / math.sqrt(n - 1) if n > 1 else math.nan
    ratio = math.exp(ln_ratio)
    dp = stats["delta_p"]

    def r(x: float, digits: int = 6) -> float:
        return round(float(x), digits)

    report = {
        "positions": n,
        "kld": {
            "mean": r(kld.mean()),
            "mean_err": r(kld.std() / math.sqrt(n - 1)) if n > 1 else None,
            "median": r(torch.quantile(kld, 0.5)),
            "p99": r(torch.quantile(kld, 0.99)),
            "max": r(kld.max()),
        },
        "same_top1_pct": r(100 * top, 3),
        "same_top1_pct_err": r(100 * math.sqrt(top * (1 - top) / (n - 1)), 3) if n > 1 else None,
        "delta_p_pct": {"mean": r(100 * dp.mean(), 4), "rms": r(100 * dp.square().mean().sqrt(), 4)},
        "ppl": {
            "reference": r(math.exp(stats["nll_ref"].mean().item()), 4),
            "quantized": r(math.exp(stats["nll_q"].mean().item()), 4),
            "ratio": r(ratio),
            "ratio_err": r(ratio * ln_ratio_err),
        },
        "gates": {"max_kld_mean": max_kld, "min_same_top1_pct": min_top1},
    }
    report["passed"] = report["kld"]["mean"] <= max_kld and report["same_top1_pct"] >= min_top1
    return report


def compare(source: Path, quantized: Path, text: tuple[str, str], max_kld: float, min_top1: float) -> dict[str, Any]:
    """Run both models over the text; the report (statistics, gates, whether they pass)."""
    from ..errors import CheckpointError
    from ..loading import load

    try:
        reference = load(source, task="causal-lm")
    except CheckpointError:
        raise LmtoolError(f"{source}: verification reads next-token probabilities and this model has no "
                          f"LM head (untied); quantize it with --no-verify") from None
    candidate = load(quantized, task="causal-lm")
    if reference.tokenizer is None:
        raise LmtoolError(f"{source}: no tokenizer, so no text to verify on (use --no-verify)")
    name, body = text
    ids = reference.tokenizer.encode(body, add_special_tokens=False)
    limit = getattr(reference.config, "max_position_embeddings", None) or MAX_CHUNK
    chunk = min(MAX_CHUNK, limit)
    pieces = chunks_of(ids, chunk, reference.config.bos_token_id)
    if not pieces:
        raise LmtoolError(f"{name}: too short to verify on ({len(ids)} tokens)")
    collected: list[dict[str, torch.Tensor]] = []
    with torch.inference_mode():
        for piece in pieces:
            tokens = torch.tensor([piece], device=reference.device)
            first = len(piece) // 2
            ref_logits = reference.model(tokens)[0, first:-1].float()
            q_logits = candidate.model(tokens.to(candidate.device))[0, first:-1].float().to(ref_logits.device)
            collected.append(position_stats(ref_logits, q_logits, tokens[0, first + 1 :]))
    stats = {k: torch.cat([c[k] for c in collected]) for k in collected[0]}
    report = summarize(stats, max_kld, min_top1)
    report = {"text": name, "tokens": len(ids), "chunks": len(pieces), "chunk_tokens": chunk, **report}
    return report
