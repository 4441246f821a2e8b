"""Stock placeholders, fewer features: which slots get a feature, which are removed.

The stock processor inserts as many placeholder tokens as the unmodified model produces features.
After the encoder stage an image or video has fewer (or padded) features; ``PlaceholderMixin``
(mixed into the inner multimodal model) accepts the stock input, fills slots in the order stock
transformers scatters features, and records for the decoder-input hook (``illava.llm``) which
slots to remove and which visual item every remaining slot belongs to (the LLM stage's spans).
"""

from __future__ import annotations

import torch


class PlaceholderMixin:
    """Modifications: ``get_placeholder_mask`` accepts the stock placeholder count for features
    produced by the patched encoder (``state.pending``) instead of requiring equal counts."""

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        image_mask, video_mask = super().get_placeholder_mask(input_ids, inputs_embeds)
        if image_features is not None:
            image_mask = self._fill_slots("image", image_mask[..., 0], image_features)[..., None]
        if video_features is not None:
            video_mask = self._fill_slots("video", video_mask[..., 0], video_features)[..., None]
        return image_mask, video_mask

    def _fill_slots(self, kind: str, slots: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Mark the slots that receive a feature; record slots to drop and the item of each slot."""
        state = self._illava
        items = state.take_pending(kind, features.shape[0])
        where = slots.nonzero()  # row-major: the order in which stock scatters features
        stock = sum(i.stock_tokens for i in items)
        if where.shape[0] != stock or sum(i.feature_tokens for i in items) != features.shape[0]:
            raise ValueError(
                f"illava: the input has {where.shape[0]} {kind} placeholder tokens but the {len(items)} "
                f"{kind}(s) need {stock} (stock transformers' count); build the prompt with the stock "
                "processor for the unmodified model"
            )
        if state.drop is None:
            state.drop = torch.zeros(slots.shape, dtype=torch.bool, device=slots.device)
            state.item_ids = torch.full(slots.shape, -1, dtype=torch.long, device=slots.device)
        fill = torch.zeros_like(slots)
        start = 0
        for item in items:
            rows, cols = where[start : start + item.stock_tokens].unbind(1)
            item.sample = int(rows[0])
            n = item.feature_tokens
            keep = torch.zeros(item.stock_tokens, dtype=torch.bool, device=slots.device)
            keep[:n] = True if item.valid is None else item.valid.to(slots.device)
            fill[rows[:n], cols[:n]] = True
            state.drop[rows[~keep], cols[~keep]] = True
            state.item_ids[rows[keep], cols[keep]] = len(state.items)
            state.items.append(item)
            start += item.stock_tokens
        state.stats.items = list(state.items)
        return fill
