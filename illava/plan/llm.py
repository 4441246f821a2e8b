"""The LLM stage's decisions for one decoder call (docs/method.md, "LLM stage").

Tensors in, tensors out; nothing here knows about transformers' hooks, masks or caches. A decoder
call (a prefill, a decoding step, the continuation of a cached conversation) goes through:

1. ``visual_spans``: which input position belongs to which image / video span;
2. ``packed_segments`` and ``exclude_last``: the sequences within each row, and the last token of
   every sequence (the scorer, never removed);
3. ``reducing_layers``: the LLM merge layers at which some span loses tokens;
4. at the decoder input, ``compact`` drops the slots the encoder stage emptied and ``shift`` tells
   how far every position moves when positions are renumbered;
5. before every merge layer, ``merge_spans`` keeps ``keep_ratio`` of every span (the policy
   chooses and recycles) and ``Sequence.gather`` follows the survivors;
6. at the decoder output, ``output_rows`` maps every input position to the token that answers for
   it (a removed position: the last kept token before it).

``Sequence`` is the state that flows through these steps: per token of the current (reduced)
sequence, whether it is real, its span, its sequence within the row and its decoder-input index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import keep_count


# ------------------------------------------------------------------------------------ tensors
def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence dimension (dim 1) of ``(B or 1, L, ...)`` with ``index`` ``(B, L')``."""
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``(B, L)`` or multi-axis ``(A, B, L)`` position ids along the sequence."""
    if positions.dim() == 2:
        return positions.expand(index.shape[0], -1).gather(1, index)
    axes = positions.shape[0]
    return positions.expand(axes, index.shape[0], -1).gather(2, index[None].expand(axes, -1, -1))


def compact(keep: torch.Tensor, pad_left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept tokens of each row in order, and the new padding mask.

    Rows are aligned right (padding on the left, as generation needs) or, with ``pad_left=False``,
    left. Padding slots point at tokens that were not kept. At least one slot remains (a padding
    slot, when nothing is kept: a prefill chunk that holds only removed placeholders).
    """
    length = max(1, int(keep.sum(1).max()))
    if pad_left:
        index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - length :]
    else:
        index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :length]
    return index, keep.gather(1, index)


def segment_cumsum(x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of ``x`` ``(B, L)`` restarting at every new value of ``segments``."""
    total = x.long().cumsum(1)
    before = total - x.long()
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    base = torch.where(start, before, torch.zeros_like(before)).cummax(1).values
    return total - base


def inverse_index(index: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, length)``: the slot of ``index`` ``(B, n)`` holding every value (-1: none), for the
    slots where ``mask`` is True."""
    b = index.shape[0]
    inverse = torch.full((b, length + 1), -1, dtype=torch.long, device=index.device)
    slot = torch.where(mask, index, length)
    inverse.scatter_(1, slot, torch.arange(index.shape[1], device=index.device).expand(b, -1))
    return inverse[:, :length]


# ------------------------------------------------------------------------------------ the sequence
@dataclass
class Sequence:
    """The current sequence of a decoder call, per token ``(B, n)``."""

    mask: torch.Tensor  # real tokens
    spans: torch.Tensor  # visual span, -1 elsewhere (and for the last token of a sequence)
    segments: torch.Tensor  # sequence within the row, -1 padding
    index: torch.Tensor  # decoder-input index of every token

    def gather(self, index: torch.Tensor, mask: torch.Tensor) -> Sequence:
        """The tokens at ``index`` ``(B, n')``; ``mask``: which of them are real."""
        return Sequence(
            mask,
            self.spans.gather(1, index).masked_fill(~mask, -1),
            self.segments.gather(1, index).masked_fill(~mask, -1),
            self.index.gather(1, index),
        )

    @property
    def segment_count(self) -> int:
        return int(self.segments.max()) + 1 if self.segments.numel() else 1

    def query_rows(self) -> torch.Tensor:
        """``(B, S)`` index of the last token of every sequence of every row."""
        n = self.segments.shape[1]
        position = torch.arange(n, device=self.segments.device)
        rows = [torch.where(self.segments == s, position, -1).max(1).values for s in range(self.segment_count)]
        return torch.stack(rows, 1).clamp(min=0)

    def key_mask(self, rows: torch.Tensor, stock: torch.Tensor | None = None, window: int | None = None):
        """``(B, S, n)``: the keys the query of every sequence (``rows``) scores: the real tokens of
        its own sequence; with a sliding ``window`` (in ``stock`` positions ``(B, n)``) only those it
        holds. A row without that sequence gets one key (its score is never used)."""
        sequences = torch.arange(rows.shape[1], device=rows.device)
        keys = (self.segments[:, None, :] == sequences[None, :, None]) & self.mask[:, None, :]
        if window is not None:
            keys &= stock.gather(1, rows)[:, :, None] - stock[:, None, :] < window
        keys[:, :, 0] |= ~keys.any(-1)
        return keys


# ------------------------------------------------------------------------------------ spans
def visual_spans(found: list[tuple[str, torch.Tensor, list[int] | None]], b: int, q: int, device):
    """``(B, q)`` visual item of every input position (-1: text), and ``(kind, row, stock tokens)``
    of every item, numbered by row then position.

    ``found``: per kind of media, its ``(B, q)`` placeholder mask and the lengths of its items in
    the order stock fills features (row-major), if known; else items are runs of consecutive
    placeholders.
    """
    spans = torch.full((b, q), -1, dtype=torch.long, device=device)
    items: list[tuple[str, int, int]] = []
    runs = []
    for kind, mask, lengths in found:
        where = mask.to(device).nonzero()  # row-major: the order stock fills features in
        if not where.shape[0]:
            continue
        if lengths is None or sum(lengths) != where.shape[0]:
            new = torch.ones(where.shape[0], dtype=torch.bool, device=device)
            new[1:] = (where[1:, 0] != where[:-1, 0]) | (where[1:, 1] != where[:-1, 1] + 1)
            starts = new.nonzero().flatten().tolist() + [where.shape[0]]
            lengths = [e - s for s, e in zip(starts[:-1], starts[1:])]
        start = 0
        for n in lengths:
            runs.append((int(where[start, 0]), int(where[start, 1]), kind, where[start : start + n]))
            start += n
    for row, _, kind, positions in sorted(runs, key=lambda f: (f[0], f[1])):
        spans[positions[:, 0], positions[:, 1]] = len(items)
        items.append((kind, row, positions.shape[0]))
    return spans, items


def packed_segments(positions: torch.Tensor | None, valid: torch.Tensor, packed: bool) -> torch.Tensor:
    """Sequence of every token within its row (-1: padding): one per row, unless sequences are
    packed in one row without a mask, told apart by position resets (``positions`` ``(B, L)``:
    the text positions)."""
    segments = torch.zeros_like(valid, dtype=torch.long)
    if packed and positions is not None:
        positions = positions.expand(valid.shape[0], -1)
        step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
        segments = (step != 1).cumsum(-1).to(valid.device)
    return segments.masked_fill(~valid, -1)


def exclude_last(spans: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The last token of every sequence is never removed by the LLM stage: it is the scorer."""
    last = torch.zeros_like(spans, dtype=torch.bool)
    last[:, :-1] = segments[:, :-1] != segments[:, 1:]
    last[:, -1] = True
    return spans.masked_fill(last & (segments >= 0), -1)


def reducing_layers(cfg, spans: torch.Tensor, removed: torch.Tensor) -> set[int]:
    """The LLM merge layers of ``cfg`` at which some visual span loses tokens (``removed``: slots
    the encoder stage emptied, dropped before the decoder)."""
    if not cfg.llm_active:
        return set()
    kept = (spans >= 0) & ~removed
    counts = torch.bincount(spans[kept]).tolist() if kept.any() else []
    counts = [n for n in counts if n]
    layers = set()
    for k in sorted(cfg.llm_layers):
        after = [keep_count(n, cfg.keep_ratio_at(k)) for n in counts]
        if after != counts:
            layers.add(k)
        counts = after
    return layers


def shift(removed: torch.Tensor, segments: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, q)``: how many placeholder slots were removed at or before every position of its
    sequence (plus ``before`` ``(B,)`` removed in earlier calls): what a renumbered position
    subtracts (the prompt as if built with fewer placeholders)."""
    moved = segment_cumsum(removed, segments)
    return moved if before is None else moved + before.to(moved.device)[:, None]


# ------------------------------------------------------------------------------------ the merge
@dataclass
class SpanMerge:
    """What ``merge_spans`` decided for one merge layer."""

    hidden: torch.Tensor  # (B, n, D) with recycled survivors written in place
    keep: torch.Tensor  # (B, n) tokens that stay
    visual_in: list[int]  # per row
    visual_out: list[int]
    step: torch.Tensor | None  # (B, n) token representing every token (-1: dropped), when traced


def merge_spans(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    seq: Sequence,
    ratio: float,
    policy,
    cfg,
    trace: bool = False,
) -> SpanMerge:
    """Keep ``keep_count(span, ratio)`` tokens of every visual span of every row, as ``policy``
    chooses and recycles from the token ``scores`` ``(B, n)``."""
    b, n, _ = hidden.shape
    keep = seq.mask.clone()
    updated = hidden.clone()
    step = torch.arange(n, device=hidden.device).expand(b, n).clone() if trace else None
    visual_in, visual_out = [], []
    for row in range(b):
        ids = seq.spans[row]
        count_in = count_out = 0
        for item in torch.unique(ids[ids >= 0]).tolist():
            idx = (ids == item).nonzero().squeeze(1)
            total = idx.numel()
            kept = keep_count(total, ratio)
            count_in, count_out = count_in + total, count_out + kept
            if kept == total:
                continue
            res = policy.reduce("llm", hidden[row, idx][None], scores[row, idx][None], total - kept, cfg)
            survivors = idx[res.kept[0]]
            updated[row, survivors] = res.tokens[0]
            keep[row, idx] = False
            keep[row, survivors] = True
            if trace:
                assign = res.assign[0]
                step[row, idx] = torch.where(assign >= 0, survivors[assign.clamp(min=0)], -1)
        visual_in.append(count_in)
        visual_out.append(count_out)
    return SpanMerge(updated, keep, visual_in, visual_out, step)


def output_rows(input_index: torch.Tensor, seq: Sequence, fed: int) -> torch.Tensor:
    """``(B, fed)``: the output token answering for every fed position: the token itself, or for a
    removed position the last kept token before it (the first token if none is)."""
    where = inverse_index(input_index.gather(1, seq.index), seq.mask, fed)
    return where.cummax(1).values.clamp(min=0)


def follow(previous: torch.Tensor, step: torch.Tensor, new_index: torch.Tensor, new_mask: torch.Tensor):
    """Source tracking across one merge: ``previous`` ``(B, fed)`` token representing every fed
    position before it, ``step`` ``(B, n)`` token representing every token (``merge_spans``), and
    the compaction after it -> the token of the new sequence representing every fed position."""
    inverse = inverse_index(new_index, new_mask, step.shape[1])
    new_of = torch.where(step >= 0, inverse.gather(1, step.clamp(min=0)), -1)
    return torch.where(previous >= 0, new_of.gather(1, previous.clamp(min=0)), -1)
