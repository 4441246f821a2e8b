"""Positions, rotary embeddings and attention masks of a reduced sequence, built with
transformers' own mask functions for every decoder layer (once per group and layer type)."""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..plan.llm import gather_positions, gather_seq, segment_cumsum


def window(config, layer: int) -> int | None:
    """The sliding window of decoder ``layer`` (tokens), ``None`` for full attention."""
    types = getattr(config, "layer_types", None)
    sliding = bool(types) and types[layer] == "sliding_attention"
    return getattr(config, "sliding_window", None) if sliding else None


def layer_kwargs(chunk, g: int, layer_type: str, hidden, i: int, config) -> dict:
    """Positions, rotary embeddings and mask of the sequence group ``g`` caches (built once per call)."""
    key = (g, layer_type)
    if key not in chunk.kwargs_cache:
        out = {}
        if chunk.before:  # a merge in this call: the survivors' own positions and embeddings
            index = chunk.seq.index
            positions, embeddings = chunk.base[layer_type]
            out["position_embeddings"] = tuple(gather_seq(t, index.to(t.device)) for t in embeddings)
            if positions is not None:
                out["position_ids"] = gather_positions(positions, index.to(positions.device))
        out["attention_mask"] = attention_mask(chunk, g, layer_type, hidden, i, config)
        chunk.kwargs_cache[key] = out
    return {name: _to(value, hidden.device) for name, value in chunk.kwargs_cache[key].items()}


def attention_mask(chunk, g: int, layer_type: str, hidden, i: int, config):
    """The mask of decoder layer ``i`` (group ``g``, ``layer_type``) for the sequence the group caches.

    Sliding windows are measured in *stock* positions: a query attends to the survivors among the
    keys stock would attend to (a slot-based window would reach further back once tokens are gone).
    Tokens of one bidirectional block (the adapter's ``decoder_masks``: Gemma 3's images) attend to
    each other both ways, as stock composes it: ``window AND (causal OR block)``. Without either, the
    plain causal mask of transformers.
    """
    device = hidden.device
    seq = chunk.group_seq[g]
    mask2d = torch.cat([chunk.past[g].to(device), seq.mask.to(device)], 1)
    size = window(config, i) if layer_type == "sliding_attention" else None
    if size is None and chunk.fed.blocks is None:
        make = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        return make(
            config=config,
            inputs_embeds=hidden,
            attention_mask=None if chunk.fed.packed else mask2d,
            cache=chunk.cache,
            position_ids=_packed_positions(chunk),
            layer_idx=i,
        )
    index, valid = seq.index.to(device), seq.mask.to(device)
    past = chunk.past[g].shape[1]
    conditions = []
    if size is not None:
        stock = torch.cat([_cached_positions(chunk, g, valid.shape[0], past, device), _stock(chunk, index, valid)], 1)
        conditions.append(lambda bi, h, qi, ki: stock[bi, qi] - stock[bi, ki] < size)
    if chunk.fed.packed:  # several sequences per row (no cache): keep them apart
        seg = chunk.group_seq[0].segments.to(device).gather(1, index).masked_fill(~valid, -1)
        conditions.append(lambda bi, h, qi, ki: seg[bi, qi] == seg[bi, ki])
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None if chunk.fed.packed else mask2d,
        cache=chunk.cache,
        position_ids=None,
        or_mask_function=_same_block(chunk, index, valid, past),
        and_mask_function=_all_of(conditions),
        layer_idx=i,
    )


def _stock(chunk, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Stock position of the tokens ``index`` (decoder-input indices), -1 for padding."""
    return chunk.fed.origin.to(index.device).gather(1, index).masked_fill(~valid, -1)


def _cached_positions(chunk, g: int, b: int, past: int, device) -> torch.Tensor:
    cached = chunk.session.positions[g].to(device) if chunk.session is not None else None
    if cached is None or cached.shape[1] != past:
        cached = torch.full((b, past), -1, dtype=torch.long, device=device)
    return cached


def _same_block(chunk, index: torch.Tensor, valid: torch.Tensor, past: int):
    """Mask function: query and key in one bidirectional block (``None`` without blocks)."""
    if chunk.fed.blocks is None:
        return None
    b, device = valid.shape[0], valid.device
    blocks = chunk.fed.blocks.to(device).gather(1, index).masked_fill(~valid, -1)
    blocks = torch.cat([torch.full((b, past), -1, dtype=torch.long, device=device), blocks], 1)

    def both(bi, h, qi, ki):
        return (blocks[bi, qi] == blocks[bi, ki]) & (blocks[bi, qi] >= 0)

    return both


def _all_of(conditions: list):
    if not conditions:
        return None

    def within(bi, h, qi, ki):
        ok = conditions[0](bi, h, qi, ki)
        for condition in conditions[1:]:
            ok = ok & condition(bi, h, qi, ki)
        return ok

    return within


def _packed_positions(chunk) -> torch.Tensor | None:
    """Positions that make transformers find the packed sequences again (``packed`` only)."""
    if not chunk.fed.packed:
        return None
    segments = chunk.seq.segments
    return segment_cumsum(torch.ones_like(segments), segments) - 1


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value
