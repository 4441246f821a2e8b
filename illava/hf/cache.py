"""The cache of a conversation whose decoder layers hold a reduced sequence.

A group of decoder layers starts at an LLM merge layer (group 0 at layer 0) and caches the sequence
reduced there. ``Session`` records, per group, which cached slots are real tokens and the stock
position of every slot; ``IllavaDynamicCache`` carries it and reports the conversation's stock
length, so ``generate`` and chat loops slice and position new tokens as with stock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache


@dataclass
class Session:
    """What a cache holds physically, per group of decoder layers."""

    groups: tuple[int, ...]  # first decoder layer of every group, 0 first
    masks: list[torch.Tensor]  # per group: (B, cached length) True for real tokens
    positions: list[torch.Tensor]  # per group: (B, cached length) stock position of every slot, -1: padding
    shift: torch.Tensor  # (B,) placeholder slots removed so far (for renumbered positions)
    offset: int = 0  # stock (logical) length minus the physical length of group 0

    @classmethod
    def fresh(cls, b: int, past: int, device) -> Session:
        """A cache of ``past`` stock tokens per row, nothing reduced yet."""
        cached = torch.ones(b, past, dtype=torch.bool, device=device)
        positions = torch.arange(past, device=device).expand(b, past)
        return cls((0,), [cached], [positions], torch.zeros(b, dtype=torch.long, device=device))

    def group_of(self, layer: int) -> int:
        return max(g for g, start in enumerate(self.groups) if start <= layer)

    def with_groups(self, starts) -> Session:
        """Groups split at ``starts`` too; a new group caches what its layers cached so far."""
        groups = tuple(sorted(set(self.groups) | set(starts)))
        old = [self.group_of(start) for start in groups]
        return Session(groups, [self.masks[g] for g in old], [self.positions[g] for g in old], self.shift, self.offset)

    def past_masks(self, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """What every group may attend to in its cache: real tokens the caller's 2D ``mask`` (over
        the stock positions) does not mask out."""
        if mask is None:
            return self.masks
        mask = mask.bool()
        return [m & (p >= 0) & mask.to(m.device).gather(1, p.clamp(min=0)) for m, p in zip(self.masks, self.positions)]

    def append(self, fed: int, input_index: torch.Tensor, removed: torch.Tensor, group_seqs: list) -> None:
        """Take a finished decoder call: ``fed`` tokens given, ``input_index`` ``(B, n0)`` the fed
        position of every decoder-input token, ``removed`` ``(B, fed)`` slots dropped at the input,
        and the sequence every group cached (``illava.plan.llm.Sequence``)."""
        origin = input_index + self.positions[0].shape[1] + self.offset
        masks, positions = [], []
        for g, seq in enumerate(group_seqs):
            stock = origin.gather(1, seq.index.to(origin.device)).masked_fill(~seq.mask, -1)
            masks.append(torch.cat([self.masks[g].to(seq.mask.device), seq.mask], 1))
            positions.append(torch.cat([self.positions[g].to(stock.device), stock], 1))
        self.masks, self.positions = masks, positions
        self.shift = self.shift + removed.sum(1).to(self.shift.device)
        self.offset += fed - input_index.shape[1]

    def rows(self, index: torch.Tensor) -> None:
        self.masks = [m[index.to(m.device)] for m in self.masks]
        self.positions = [p[index.to(p.device)] for p in self.positions]
        self.shift = self.shift[index.to(self.shift.device)]


class IllavaDynamicCache(DynamicCache):
    """A ``DynamicCache`` whose layers hold a reduced sequence (``illava: Session``).

    ``get_seq_length()`` is the stock length: the tokens of the conversation as given, which is
    what ``generate``, chat loops and M-RoPE use to slice and position new tokens. Attention masks
    use each layer's physical length (``get_query_offset``, ``get_mask_sizes``).
    """

    illava: Session | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length() + (self.illava.offset if self.illava is not None else 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self.illava.masks = [m[:, :tokens_to_remove] for m in self.illava.masks]
            self.illava.positions = [p[:, :tokens_to_remove] for p in self.illava.positions]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.illava.rows(torch.arange(self.illava.shift.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.illava.rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.illava.rows(beam_idx)


def open_session(cache, session: Session | None, groups, b: int, past: int, device) -> Session:
    """The session of ``cache`` split at the merge layers ``groups`` (a stock ``DynamicCache``
    becomes an ``IllavaDynamicCache`` holding ``past`` stock tokens)."""
    if session is None:
        if type(cache) not in (DynamicCache, IllavaDynamicCache):
            raise ValueError(
                f"illava: reducing tokens needs a DynamicCache (generate's default), got {type(cache).__name__}"
            )
        session = Session.fresh(b, past, device)
        cache.__class__ = IllavaDynamicCache
    session = session.with_groups(groups)
    cache.illava = session
    return session
