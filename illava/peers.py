"""Peer methods as pure tensor functions, written from the papers' descriptions (docs/peers.md).

Nothing here knows about any model; ``illava.policy`` plugs them into the stages. Every function
returns an ``illava.merge.MergeResult`` (survivors in their original order, and the output token
that represents every input token, -1 if dropped) or a score, so that source tracking, layout and
statistics work for every method alike.

- ``received_from_all``: FastV's score, the attention a token receives from all queries;
- ``bipartite_merge``: ToMe's bipartite soft matching with size-weighted merging;
- ``dominant_contextual``: VisionZip's dominant tokens and contextual merging;
- ``diverse_subset``: DivPrune's greedy max-min diversity subset;
- ``grid_pool``: average pooling of a token grid (the pooling control).
"""

from __future__ import annotations

import math

import torch

from .merge import MergeResult, _assign, _gather

_MAX_PROB_BYTES = 32 * 2**20


def received_from_all(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor,
    segments: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """FastV's score: the attention every key receives from all queries, heads averaged ``(B, L)``.

    ``query`` ``(B, H, L, hd)``, ``key`` ``(B, Hkv, L, hd)`` (grouped-query attention), ``key_mask``
    ``(B, L)`` True for real tokens. ``s_j = (1 / Q) sum_i mean_h softmax_i(q_i . k * scale)[j]``
    over the Q real queries of the row; with ``causal`` query ``i`` sees keys ``j <= i``, and only
    keys of its own sequence when ``segments`` ``(B, L)`` tells packed sequences apart. Query rows
    are processed in chunks (at most 32 MB of probabilities at once): never the ``L x L`` matrix.
    """
    b, h, n, hd = query.shape
    kv = key.shape[1]
    k = key.float().repeat_interleave(h // kv, dim=1)
    valid = key_mask.bool()
    rows = max(1, _MAX_PROB_BYTES // max(h * n * 4, 1))
    received = torch.zeros(b, n, dtype=torch.float32, device=query.device)
    position = torch.arange(n, device=query.device)
    for start in range(0, n, rows):
        q = query[:, :, start : start + rows].float()
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, rows, L)
        allowed = valid[:, None, None, :].expand(b, 1, q.shape[2], n)
        if causal:
            allowed = allowed & (position[None, None, None, :] <= position[start : start + rows, None])
        if segments is not None:
            allowed = allowed & (segments[:, None, start : start + rows, None] == segments[:, None, None, :])
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        real = valid[:, start : start + rows].float()  # padding queries do not count
        received += (probs.mean(1) * real[..., None]).sum(1)
    return received / valid.float().sum(1, keepdim=True).clamp(min=1)


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int, sizes: torch.Tensor | None = None) -> MergeResult:
    """ToMe's bipartite soft matching: merge ``r`` tokens of every row of ``x`` ``(B, N, D)``.

    Tokens alternate into sets A (even positions) and B (odd positions). Every A token finds the B
    token whose ``metric`` (keys) is most similar (cosine); the ``r`` A tokens with the most similar
    matches are merged into them, size-weighted: ``x_b = (s_b x_b + sum s_a x_a) / (s_b + sum s_a)``
    (``sizes`` default 1). Ties: lower index first (stable sort).
    """
    b, n, d = x.shape
    a_idx = torch.arange(0, n, 2, device=x.device)
    b_idx = torch.arange(1, n, 2, device=x.device)
    r = min(r, a_idx.numel(), b_idx.numel())
    if r <= 0:
        idx = torch.arange(n, device=x.device).expand(b, n)
        return MergeResult(x, idx, idx)
    sizes = torch.ones(b, n, device=x.device) if sizes is None else sizes.float()
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    similarity = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # (B, |A|, |B|)
    best, match = similarity.max(dim=-1)
    order = torch.argsort(best, dim=1, descending=True, stable=True)
    merged_a = a_idx[order[:, :r]]  # (B, r) input index of every merged A token
    target = b_idx[match.gather(1, order[:, :r])]  # (B, r) input index of its B token
    weighted = x.float() * sizes[..., None]
    total = weighted.clone()
    mass = sizes.clone()
    total.scatter_add_(1, target[..., None].expand(b, r, d), _gather(weighted, merged_a))
    mass.scatter_add_(1, target, sizes.gather(1, merged_a))
    values = (total / mass[..., None]).to(x.dtype)
    keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
    keep.scatter_(1, merged_a, False)
    kept = keep.nonzero()[:, 1].view(b, n - r)
    assign = _assign(kept, n)
    assign = assign.scatter(1, merged_a, assign.gather(1, target))
    return MergeResult(_gather(values, kept), kept, assign)


def dominant_contextual(
    x: torch.Tensor, scores: torch.Tensor, dominant: int, contextual: int, metric: torch.Tensor | None = None
) -> MergeResult:
    """VisionZip: keep the ``dominant`` top-scored tokens; of the others (in order), ``contextual``
    evenly spaced targets; every remaining token is averaged into its most similar target (dot
    product of ``metric``, default ``x``): ``x_t = mean(x_t, members of t)``."""
    b, n, d = x.shape
    metric = x if metric is None else metric
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    top = order[:, :dominant]
    rest = order[:, dominant:].sort(dim=1).values  # the others, in their original order
    m = rest.shape[1]
    contextual = min(contextual, m)
    if contextual == 0:
        kept = top.sort(dim=1).values
        return MergeResult(_gather(x, kept), kept, _assign(kept, n))
    pick = torch.linspace(0, m - 1, contextual, device=x.device).round().long()
    targets = rest[:, pick]  # (B, C)
    is_target = torch.zeros(b, m, dtype=torch.bool, device=x.device)
    is_target[:, pick] = True
    others = rest[~is_target].view(b, m - contextual)
    similarity = _gather(metric.float(), others) @ _gather(metric.float(), targets).transpose(1, 2)
    owner = targets.gather(1, similarity.argmax(-1))  # (B, others) target of every other token
    total = x.float().clone()
    count = torch.ones(b, n, device=x.device)
    total.scatter_add_(1, owner[..., None].expand(-1, -1, d), _gather(x.float(), others))
    count.scatter_add_(1, owner, torch.ones_like(owner, dtype=torch.float32))
    values = (total / count[..., None]).to(x.dtype)
    kept = torch.cat([top, targets], 1).sort(dim=1).values
    assign = _assign(kept, n)
    assign = assign.scatter(1, others, assign.gather(1, owner))
    return MergeResult(_gather(values, kept), kept, assign)


def diverse_subset(x: torch.Tensor, m: int) -> torch.Tensor:
    """DivPrune: indices ``(m,)`` of a max-min diverse subset of the rows of ``x`` ``(N, D)``, in order.

    Cosine distance ``1 - cos``. The first token is the one farthest from the rest (largest mean
    distance); then, greedily, the token whose minimum distance to the chosen set is largest
    (ties: lower index).
    """
    n = x.shape[0]
    m = min(m, n)
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    distance = 1 - unit @ unit.T
    chosen = [int(distance.mean(1).argmax())]
    nearest = distance[chosen[0]].clone()
    nearest[chosen[0]] = -1.0
    for _ in range(m - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, distance[pick])
        nearest[chosen] = -1.0
    return torch.tensor(sorted(chosen), device=x.device)


def grid_pool(x: torch.Tensor, grid: tuple[int, int], cells: tuple[int, int]) -> MergeResult:
    """Average pooling of rows of ``x`` ``(B, N, D)`` laid out on a raster ``grid`` (rows, cols)
    into ``cells`` (rows, cols); a cell's token stands at its first unit (raster order)."""
    b, n, d = x.shape
    rows, cols = grid
    position = torch.arange(n, device=x.device)
    cell = (position // cols) * cells[0] // rows * cells[1] + (position % cols) * cells[1] // cols
    first = torch.full((cells[0] * cells[1],), n, dtype=torch.long, device=x.device)
    first = first.scatter_reduce(0, cell, position, reduce="amin")
    occupied = first < n
    kept = first[occupied].expand(b, -1)
    total = torch.zeros(b, cells[0] * cells[1], d, device=x.device).index_add_(1, cell, x.float())
    count = torch.bincount(cell, minlength=cells[0] * cells[1]).clamp(min=1)
    means = (total / count[None, :, None])[:, occupied].to(x.dtype)
    slot = torch.cumsum(occupied.long(), 0) - 1
    assign = slot[cell].expand(b, n)
    return MergeResult(means, kept, assign.contiguous())


def cells_for(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    """A pooling grid of at most ``keep`` cells with about the aspect ratio of ``grid``."""
    rows, cols = grid
    r = max(1, min(rows, round(rows * math.sqrt(max(keep, 1) / (rows * cols)))))
    return r, max(1, min(cols, keep // r))
