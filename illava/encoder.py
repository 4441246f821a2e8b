"""Encoder stage helpers shared by the adapters: one merge step with source tracking, and the
layout of survivors on the patch grid they came from."""

from __future__ import annotations

import torch

from .config import removal_count
from .merge import compose_assign, merge
from .state import EncoderTrace, IllavaState


def encoder_merge(state: IllavaState, layer: int, hidden: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """Remove and recycle the configured number of tokens of every crop at encoder ``layer``."""
    cfg = state.config
    b, n, _ = hidden.shape
    if state.encoder_trace is None:
        state.encoder_trace = EncoderTrace.start(b, n, hidden.device)
    trace = state.encoder_trace
    r = removal_count(n, cfg.removal_at(layer))
    res = merge(
        hidden, received, r, cfg.recycle, neighbours=cfg.cluster_neighbours, recycle_fraction=cfg.cluster_fraction
    )
    before = trace.positions.to(hidden.device)
    trace.positions = before.gather(1, res.kept)
    trace.assign = compose_assign(trace.assign.to(hidden.device), res.assign)
    if state.record:
        n0 = trace.assign.shape[1]
        owner = torch.where(trace.assign >= 0, trace.positions.gather(1, trace.assign.clamp(min=0)), -1)
        scores = torch.full((b, n0), float("nan"), device=hidden.device).scatter(1, before, received.float())
        trace.records.append((layer, owner.cpu(), scores.cpu()))
    trace.layers.append((layer, b * n, b * (n - r)))  # totals over the crops of the call
    return res.tokens


def pool_survivors(
    features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, grid: tuple[int, int], cells: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average survivors lying in the same cell of a ``cells`` grid laid over a ``grid`` of patches.

    ``features`` ``(K, D)``, ``rows``/``cols`` ``(K,)`` patch coordinates. Returns the mean feature
    of every occupied cell in raster order with the cell's row and column, and the output token of
    every survivor; empty cells yield no token (a survivor is never invented).
    """
    cell_r = rows * cells[0] // grid[0]
    cell_c = cols * cells[1] // grid[1]
    cell = cell_r * cells[1] + cell_c
    occupied, inverse = torch.unique(cell, return_inverse=True)  # sorted = raster order
    sums = torch.zeros(occupied.numel(), features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, inverse, features.float())
    counts = torch.bincount(inverse, minlength=occupied.numel()).clamp(min=1)
    means = (sums / counts[:, None]).to(features.dtype)
    return means, occupied // cells[1], occupied % cells[1], inverse


def rows_with_newlines(
    features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, num_rows: int, newline: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in raster order with ``newline`` after every row of the grid (empty rows too), and
    the output position of every input token."""
    width = int(cols.max()) + 2 if cols.numel() else 1
    keys = torch.cat([rows * width + cols, torch.arange(num_rows, device=rows.device) * width + width - 1])
    tokens = torch.cat([features, newline.to(features)[None].expand(num_rows, -1)])
    order = torch.argsort(keys, stable=True)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel(), device=order.device)
    return tokens[order], where[: features.shape[0]]
