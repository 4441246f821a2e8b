"""The iLLaVA algorithm as pure tensor functions; nothing here knows about any model.

Scoring:
- ``attention_with_received_scores``: self-attention of an encoder layer that also returns, for
  every token, the attention it receives (mean over heads and queries of the softmax).
- ``query_scores``: the attention a few query rows (the last token of each sequence) pay to
  every key.

Recycling (``merge``): remove ``r`` tokens of each row and fold them into survivors with one of
the modes of docs/method.md (``rank``, ``cluster``, ``prune``). Survivors keep their relative order.
``MergeResult.assign`` maps every input token to the output token that now represents it (-1:
dropped), which is what source tracking composes across layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Bound on the float32 attention probabilities (and their logits) materialised at once in an
# encoder merge layer: chunks of crops, or of query rows when one crop alone exceeds it.
_MAX_PROB_BYTES = 32 * 2**20


def attention_with_received_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager softmax attention that also returns the attention each token receives.

    ``query``/``key``/``value``: ``(B, H, N, hd)``. Returns the attention output ``(B, N, H, hd)``
    (the layout ``eager_attention_forward`` returns) and ``received`` ``(B, N)`` in float32:
    ``received[b, j] = mean_h mean_i softmax(q k^T * scale)[b, h, i, j]``. The probabilities are
    the ones used for the output, so scoring costs no second ``QK^T``; crops (or query rows of
    one crop) are processed in chunks so that at most ``_MAX_PROB_BYTES`` of probabilities exist
    at once, which keeps the peak memory of a merge layer near that of fused attention.
    """
    b, h, n, _ = query.shape
    m = key.shape[2]
    per_crop = h * n * m * 4
    crops = max(1, _MAX_PROB_BYTES // max(per_crop, 1))
    rows = n if crops > 1 else max(1, _MAX_PROB_BYTES // max(h * m * 4, 1))
    out = query.new_empty(b, h, n, value.shape[-1])
    received = torch.zeros(b, m, dtype=torch.float32, device=query.device)
    for c in range(0, b, crops):
        cs = slice(c, c + crops)
        for r in range(0, n, rows):
            rs = slice(r, r + rows)
            logits = torch.matmul(query[cs, :, rs], key[cs].transpose(-1, -2)) * scale
            if attention_mask is not None:
                mask = attention_mask[cs] if attention_mask.shape[0] > 1 else attention_mask
                logits = logits + (mask[..., rs, :] if mask.shape[-2] > 1 else mask)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            received[cs] += probs.sum(dim=(1, 2))
            out[cs, :, rs] = torch.matmul(probs.to(value.dtype), value[cs])
            del probs
    received /= h * n
    return out.transpose(1, 2).contiguous(), received


def query_scores(query: torch.Tensor, key: torch.Tensor, scale: float, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention a few query rows pay to every key, averaged over heads: ``(B, S, L)`` float32.

    ``query``: ``(B, H, S, hd)`` (S rows, e.g. the last token of each sequence of a row);
    ``key``: ``(B, Hkv, L, hd)`` with ``H`` a multiple of ``Hkv`` (grouped-query attention);
    ``key_mask``: ``(B, S, L)``, True for the keys query row ``s`` may see (every row sees at least
    one). ``scores[b, s, l] = mean_h softmax_l(q[b, h, s] . k[b, h, l] * scale)``; only these S
    rows are formed, never the ``L x L`` attention matrix.
    """
    b, h, s, hd = query.shape
    kv = key.shape[1]
    q = query.float().reshape(b, kv, h // kv, s, hd)
    logits = torch.einsum("bkgsd,bkld->bkgsl", q, key.float()) * scale
    logits = logits.masked_fill(~key_mask[:, None, None].bool(), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


@dataclass
class MergeResult:
    tokens: torch.Tensor  # (B, N - r, D) survivors, recycled values included
    kept: torch.Tensor  # (B, N - r) input index of each survivor, ascending
    assign: torch.Tensor  # (B, N) output index representing each input token, -1 if dropped


def merge(
    x: torch.Tensor,
    scores: torch.Tensor,
    r: int,
    mode: str = "rank",
    *,
    neighbours: int = 5,
    recycle_fraction: float = 0.05,
) -> MergeResult:
    """Remove the ``r`` lowest-scored tokens of every row of ``x`` ``(B, N, D)`` and recycle them.

    Modes (docs/method.md):
    - ``rank``: the r+1 lowest-scored tokens p0..pr (ascending score) are averaged with weights
      ``w_t = r + 1 - t`` into ``pr``; p0..p(r-1) are deleted.
    - ``cluster``: of the ``P = N - r`` kept tokens the top ``P - Pc`` stay as they are; the next
      ``Pc = max(1, round(recycle_fraction * P))`` each take their ``M = neighbours`` most similar
      removed tokens (dot product): ``x_c = (x_c + sum softmax(sim / sqrt(D)) x) / 2``. A removed
      token chosen by several recycling tokens is tracked to the one that weights it most.
    - ``prune``: the removed tokens are dropped.
    Ties in the scores are broken by position (stable sort), so results are deterministic.
    """
    b, n, _ = x.shape
    device = x.device
    if not 0 <= r < n:
        raise ValueError(f"cannot remove {r} of {n} tokens")
    if r == 0:
        idx = torch.arange(n, device=device).expand(b, n)
        return MergeResult(x, idx, idx)
    if mode == "rank":
        return _merge_rank(x, scores, r)
    if mode == "cluster":
        return _merge_cluster(x, scores, r, neighbours, recycle_fraction)
    if mode == "prune":
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        kept = order[:, : n - r].sort(dim=1).values
        return MergeResult(_gather(x, kept), kept, _assign(kept, n))
    raise ValueError(f"unknown recycle mode {mode!r}")


def _merge_rank(x: torch.Tensor, scores: torch.Tensor, r: int) -> MergeResult:
    b, n, d = x.shape
    order = torch.argsort(scores, dim=1, stable=True)  # ascending score
    low = order[:, : r + 1]
    weights = torch.arange(r + 1, 0, -1, device=x.device, dtype=torch.float32)
    merged = (_gather(x, low).float() * weights[None, :, None]).sum(1) / weights.sum()
    target = low[:, r : r + 1]
    x = x.scatter(1, target[..., None].expand(b, 1, d), merged[:, None].to(x.dtype))
    kept = order[:, r:].sort(dim=1).values
    assign = _assign(kept, n)
    absorbed = assign.gather(1, target).expand(b, r)
    assign = assign.scatter(1, low[:, :r], absorbed)
    return MergeResult(_gather(x, kept), kept, assign)


def _merge_cluster(x: torch.Tensor, scores: torch.Tensor, r: int, neighbours: int, fraction: float) -> MergeResult:
    b, n, d = x.shape
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    p = n - r
    pc = min(p, max(1, int(fraction * p + 0.5)))
    recyclers, removed = order[:, p - pc : p], order[:, p:]
    xr, xd = _gather(x, recyclers).float(), _gather(x, removed).float()
    m = min(neighbours, r)
    sim, pick = torch.einsum("bcd,brd->bcr", xr, xd).topk(m, dim=-1)  # (B, Pc, M)
    weight = torch.softmax(sim / math.sqrt(d), dim=-1)
    chosen = torch.gather(xd[:, None].expand(b, pc, r, d), 2, pick[..., None].expand(b, pc, m, d))
    xr = (xr + (weight[..., None] * chosen).sum(2)) / 2
    x = x.scatter(1, recyclers[..., None].expand(b, pc, d), xr.to(x.dtype))
    kept = order[:, :p].sort(dim=1).values
    assign = _assign(kept, n)
    # weight each recycling token gives each removed token (0 where it did not choose it)
    full = torch.zeros(b, pc, r, device=x.device).scatter(2, pick, weight)
    best_weight, best = full.max(dim=1)  # (B, r)
    owner = assign.gather(1, recyclers.gather(1, best))
    assign = assign.scatter(1, removed, torch.where(best_weight > 0, owner, torch.full_like(owner, -1)))
    return MergeResult(_gather(x, kept), kept, assign)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _assign(kept: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) output index of each kept input token, -1 elsewhere."""
    b, p = kept.shape
    out = torch.full((b, n), -1, dtype=torch.long, device=kept.device)
    return out.scatter(1, kept, torch.arange(p, device=kept.device).expand(b, p))


def compose_assign(previous: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Source tracking across two merges: original -> current token after ``step``."""
    safe = previous.clamp(min=0)
    return torch.where(previous >= 0, step.gather(1, safe), previous)
