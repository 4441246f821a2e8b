"""Per-model state shared by reference by every patched module, and the token statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import IllavaConfig


@dataclass
class EncoderTrace:
    """Source tracking through one call of the vision encoder (all crops / frames of the call)."""

    positions: torch.Tensor  # (B, N) original patch index of each current token's own patch
    assign: torch.Tensor  # (B, N0) current token representing each original patch, -1 if dropped
    layers: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, tokens in, out), all crops
    # recorded only while ``IllavaState.record`` is set (``illava.viz``): per merge layer, the
    # original patch of the token representing each original patch (-1: dropped) and the score of
    # each patch still present before the merge (NaN: already merged away)
    records: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def start(cls, batch: int, tokens: int, device: torch.device) -> EncoderTrace:
        idx = torch.arange(tokens, device=device).expand(batch, tokens)
        return cls(positions=idx, assign=idx)


@dataclass
class VisualItem:
    """One image or video as the LLM sees it: placeholder slots of stock transformers vs features."""

    kind: str  # "image" or "video"
    stock_tokens: int  # placeholders the stock processor inserts for it
    feature_tokens: int  # feature vectors produced for it (padding included)
    valid: torch.Tensor | None = None  # (feature_tokens,) False for padding features
    crops: int = 1
    sample: int = -1
    # ``illava.viz`` source tracking, filled only while ``IllavaState.record`` is set: units (patches,
    # or 2x2 blocks for Qwen-VL) of the item, encoder steps and the LLM-input token of every unit
    trace: dict | None = None

    @property
    def tokens(self) -> int:
        return self.feature_tokens if self.valid is None else int(self.valid.sum())


@dataclass
class LLMLayerStats:
    layer: int
    visual_in: list[int]  # per sample
    visual_out: list[int]
    sequence_in: int  # padded batch length
    sequence_out: int


@dataclass
class Stats:
    """Visual tokens per stage for the last prefill. ``str(stats)`` is a readable table."""

    # one entry per encoder call: kind, crops (crops or frames), tokens (entering the encoder, all
    # crops), layers [(layer, tokens in, tokens out)] with totals over the crops
    encoder: list[dict] = field(default_factory=list)
    items: list[VisualItem] = field(default_factory=list)
    llm: list[LLMLayerStats] = field(default_factory=list)
    sequence_in: int = 0  # LLM input length as given (padded, with stock placeholders)
    sequence_after_encoder: int = 0

    def visual_tokens(self, sample: int | None = None) -> dict[str, int]:
        """Visual tokens entering the LLM: stock count, after the encoder stage, after the LLM stage."""
        items = [i for i in self.items if sample is None or i.sample == sample]
        stock = sum(i.stock_tokens for i in items)
        after_encoder = sum(i.tokens for i in items)
        after_llm = after_encoder
        for layer in self.llm:
            outs = layer.visual_out if sample is None else [layer.visual_out[sample]]
            after_llm = sum(outs)
        return {"stock": stock, "after_encoder": after_encoder, "after_llm": after_llm}

    def as_dict(self) -> dict:
        return {
            "encoder": self.encoder,
            "items": [
                {
                    "kind": i.kind,
                    "sample": i.sample,
                    "crops": i.crops,
                    "stock_tokens": i.stock_tokens,
                    "tokens": i.tokens,
                }
                for i in self.items
            ],
            "llm": [vars(layer) for layer in self.llm],
            "sequence_in": self.sequence_in,
            "sequence_after_encoder": self.sequence_after_encoder,
            "visual_tokens": self.visual_tokens(),
        }

    def __str__(self) -> str:
        lines = []
        for enc in self.encoder:
            crops = enc["crops"]
            steps = ", ".join(f"L{layer}: {a / crops:g}->{b / crops:g}" for layer, a, b in enc["layers"])
            lines.append(
                f"encoder ({enc['kind']}, {crops} crops/frames, {enc['tokens'] / crops:g} tokens each): "
                f"{steps or 'no merge'} per crop/frame"
            )
        for i in self.items:
            lines.append(f"sample {i.sample} {i.kind}: {i.stock_tokens} stock tokens -> {i.tokens} after encoder stage")
        for layer in self.llm:
            lines.append(
                f"LLM layer {layer.layer}: visual {sum(layer.visual_in)} -> {sum(layer.visual_out)}, "
                f"sequence {layer.sequence_in} -> {layer.sequence_out}"
            )
        total = self.visual_tokens()
        lines.append(
            f"visual tokens: {total['stock']} stock -> {total['after_encoder']} after encoder -> "
            f"{total['after_llm']} after LLM stage"
        )
        return "\n".join(lines)


@dataclass
class IllavaState:
    config: IllavaConfig
    encoder_trace: EncoderTrace | None = None
    # features computed but not yet placed: kind -> list of (items, encoder stats) per encoder call.
    # generate() runs the encoder before the forward pass, so this survives new_forward().
    pending: dict[str, list[tuple[list[VisualItem], dict | None]]] = field(default_factory=dict)
    drop: torch.Tensor | None = None  # (B, L) placeholder slots without a feature
    item_ids: torch.Tensor | None = None  # (B, L) visual item of each slot, -1 for text
    items: list[VisualItem] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    session: object | None = None  # the LLM-stage session of the forward in progress
    # After the decoder-input compaction, are positions renumbered as if the prompt had been built
    # with fewer placeholders (LLaVA: the authors' setting) or gathered from the survivors' true
    # positions (Qwen-VL's M-RoPE, whose decoding positions come from stock rope deltas)?
    renumber_positions: bool = True
    # Qwen-VL vision encoder: reduced inputs handed to the blocks after a merge
    vision: object | None = None
    vision_kind: str = "image"
    # source tracking for ``illava.viz`` (costs a little time and memory; off by default)
    record: bool = False
    llm_trace: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def add_pending(self, kind: str, items: list[VisualItem], encoder_stats: dict) -> None:
        self.pending.setdefault(kind, []).append((items, encoder_stats))

    def take_pending(self, kind: str, feature_tokens: int) -> list[VisualItem]:
        """The newest encoder call's items whose features add up to ``feature_tokens``; older
        calls (features computed and never used) are discarded."""
        for items, encoder_stats in reversed(self.pending.pop(kind, [])):
            if sum(i.feature_tokens for i in items) == feature_tokens:
                self.stats.encoder.append(encoder_stats)
                return items
        return []

    def new_forward(self, prefill: bool) -> None:
        self.drop = None
        self.item_ids = None
        self.items = []
        self.session = None
        if prefill:
            self.stats = Stats()
            self.llm_trace = {}
