"""What a patched model holds, what one call holds, and the statistics of a prefill.

- ``IllavaState``: one per patched model, shared by reference by every patch: the configuration,
  the family adapter and the statistics of the last prefill. It holds no per-call data.
- ``CallScope``: one per call of the model on one thread, opened by the outermost patched call
  (``generate`` encodes images before the forward pass, so an encoder call may have a scope of
  its own) and shared by nested ones; opening it is the one reset point. Everything one forward
  needs to carry from one patched module to another lives here (the LLM stage's ``Chunk``
  included); two threads never see each other's scope.
- Decoding state lives on the cache (``illava.hf.cache.Session``), so every conversation carries its own.
"""

from __future__ import annotations

import copy
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .config import IllavaConfig
from .policy import Policy, policy_of

if TYPE_CHECKING:
    from .plan.encoder import CropTrace


@dataclass
class UnitTrace:
    """Source tracking through one encoder call, in one format for every family.

    A *unit* is what the encoder stage removes: a patch, or a 2x2 block of patches for families
    whose projector folds blocks into one LLM token. Units are numbered over the call: crop (or
    frame, tile) after crop, each crop's units in raster order of its unit grid.
    """

    grids: list[tuple[int, int]]  # unit grid (rows, cols) of every crop
    # per merge layer: the unit whose token represents each unit (-1: dropped) and each unit's score
    # before the merge (NaN where already merged away)
    layers: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    feature: torch.Tensor | None = None  # (units,) row of the call's feature output holding each unit, -1: none


@dataclass
class EncoderCall:
    """One call of the vision encoder (``get_image_features`` / ``get_video_features``)."""

    kind: str  # "image" or "video"
    crops: int = 0  # crops / frames / tiles encoded
    tokens: int = 0  # tokens entering the encoder, all crops
    layers: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, tokens in, out), all crops
    item_crops: list[int] = field(default_factory=list)  # crops of every image / video, in feature order
    # removals capped on crops too small to give them: (layer, crops, tokens asked, removed per crop)
    capped: list[tuple[int, int, int, int]] = field(default_factory=list)
    # where every unit's feature went, in the family's own typed record (filled by every forward; read
    # after it by the model mixin's ``_illava_units`` for ``illava.tools.viz`` and ``illava.tools.schedule``)
    layout: Any = None
    # the bookkeeping of the merges during the call, one typed field per kind of family:
    crop_trace: CropTrace | None = None  # crops of square ViTs: the trace after the last merge so far
    vision_run: Any = None  # Qwen-VL / Qwen3-VL: the packed sequence after every merge (``adapters.qwen_vl.VisionRun``)
    kept_blocks: torch.Tensor | None = None  # InternVL: the 2x2 blocks every tile keeps
    video_slots: tuple[CropTrace, torch.Tensor] | None = None  # LLaVA-OneVision: frames' trace and pooled slots

    def as_stats(self) -> dict:
        out = {"kind": self.kind, "crops": self.crops, "tokens": self.tokens, "layers": list(self.layers)}
        if self.capped:
            out["capped"] = list(self.capped)
        return out


@dataclass
class VisualItem:
    """One image or video span of one sample as the LLM saw it."""

    kind: str
    sample: int
    stock_tokens: int  # placeholders the stock processor inserted for it
    tokens: int  # those that kept a feature after the encoder stage
    crops: int | None = None


@dataclass
class LLMLayerStats:
    layer: int
    visual_in: list[int]  # per sample
    visual_out: list[int]
    sequence_in: int  # padded batch length
    sequence_out: int


@dataclass
class ForwardTrace:
    """Source tracking of one forward (recorded for ``illava.tools.viz``)."""

    calls: dict[str, EncoderCall]  # kind -> the encoder call whose features filled its placeholders
    placeholders: dict[str, torch.Tensor]  # kind -> (B, L) placeholder mask of the input
    # per LLM merge layer: (layer, (B, L) index of the token representing every input position after
    # the layer (-1: dropped), (B, N) input position of every token after the layer); entry 0 is the
    # decoder input after the placeholder compaction
    llm: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # kind -> the source tracking of its encoder call, derived after the forward from the call
    # (``illava.tools.viz.trace``: ``FeatureCalls._illava_units``)
    units: dict[str, UnitTrace] = field(default_factory=dict)


@dataclass
class Stats:
    """Visual tokens per stage for the last prefill. ``str(stats)`` is a readable table."""

    # one entry per encoder call: kind, crops (crops or frames), tokens (entering the encoder, all
    # crops), layers [(layer, tokens in, tokens out)] with totals over the crops, and where a removal
    # was capped on small crops, capped [(layer, crops, tokens asked, tokens removed per crop)]
    encoder: list[dict] = field(default_factory=list)
    items: list[VisualItem] = field(default_factory=list)
    llm: list[LLMLayerStats] = field(default_factory=list)
    sequence_in: int = 0  # LLM input length as given (padded, with stock placeholders)
    sequence_after_encoder: int = 0
    trace: ForwardTrace | None = None

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
            "items": [vars(i) for i in self.items],
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
            for layer, n, asked, removed in enc.get("capped", ()):
                lines.append(
                    f"  L{layer}: {n} crop(s)/frame(s) too small to remove {asked} tokens: "
                    f"removed {removed} each (capped)"
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
class CallScope:
    """Everything one call carries from one patched module to the next (one thread)."""

    record: bool = False
    stats: Stats = field(default_factory=Stats)
    encoder_call: EncoderCall | None = None  # the encoder call in progress
    encoder_outputs: dict[str, object] = field(default_factory=dict)  # kind -> feature output used
    placeholders: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (B, L) mask
    chunk: object | None = None  # the LLM stage's bookkeeping of the decoder call in progress (illava.hf.llm.Chunk)
    published: bool = False  # the call held visual tokens: its statistics become the model's last
    owner: object | None = None  # the hook that opened it
    model_inputs: dict = field(default_factory=dict)  # inner-model inputs an adapter needs later (``decoder_masks``)

    def adopt(self, inputs: dict) -> None:
        """The encoder outputs the inner model was given (``mm_encoder_outputs``, reused by ``generate``)."""
        outputs = inputs.get("mm_encoder_outputs") or {}
        self.encoder_outputs.update({kind: out for kind, out in outputs.items() if out is not None})


class TensorKeyed:
    """A mapping from live tensors (by identity) to values; an entry goes when its tensor does."""

    def __init__(self):
        self._data: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, key: torch.Tensor, default=None):
        entry = self._data.get(id(key))
        if entry is None or entry[0]() is not key:
            return default
        return entry[1]

    def __setitem__(self, key: torch.Tensor, value) -> None:
        ident = id(key)
        self._data[ident] = (weakref.ref(key), value)
        weakref.finalize(key, self._data.pop, ident, None)


class IllavaState:
    """Shared by every patch of one model: configuration, adapter, last statistics."""

    def __init__(self, config: IllavaConfig, adapter):
        self.config = config
        self.adapter = adapter
        self.last_stats = Stats()
        self._local = threading.local()
        # per-call data reachable from tensors of that call: gradient checkpointing runs layers
        # again during backward, after the call (and its scope) ended, possibly on another thread
        self.keyed = TensorKeyed()

    @property
    def policy(self) -> Policy:
        return policy_of(self.config)

    def reduces(self, inputs: dict | None = None) -> bool:
        """Whether a call may remove tokens, so that it cannot run traced by ``torch.compile``: it
        continues a cache that illava reduced, or it holds visual inputs (``pixel_values*`` of the
        inner model's ``inputs``; ``None``: a call that handles visual tokens) under a
        configuration that removes tokens."""
        if inputs is None:
            return self.config.reduces
        cache = inputs.get("past_key_values", inputs.get("cache"))
        if getattr(cache, "illava", None) is not None:
            return True
        visual = any(value is not None for name, value in inputs.items() if name.startswith("pixel_values"))
        return visual and self.config.reduces

    def current(self) -> CallScope | None:
        return getattr(self._local, "scope", None)

    def open_scope(self, owner) -> CallScope:
        scope = CallScope(record=getattr(self._local, "record", False), owner=owner)
        self._local.scope = scope
        return scope

    def close_scope(self, owner) -> None:
        scope = self.current()
        if scope is not None and scope.owner is owner:
            self._local.scope = None
            if scope.published:
                self.last_stats = scope.stats

    def chunk(self):
        """The LLM stage's bookkeeping of the decoder call in progress on this thread."""
        scope = self.current()
        return scope.chunk if scope is not None else None

    @contextmanager
    def scope(self):
        """This thread's call scope: opened by the outermost patched call, shared by nested ones."""
        scope = self.current()
        if scope is not None:
            yield scope
            return
        token = object()
        scope = self.open_scope(token)
        try:
            yield scope
        finally:
            self.close_scope(token)

    @contextmanager
    def recording(self):
        """Record source tracking in the calls made inside this block (this thread only)."""
        self._local.record = True
        try:
            yield
        finally:
            self._local.record = False

    def __deepcopy__(self, memo):
        twin = IllavaState.__new__(IllavaState)
        memo[id(self)] = twin
        twin.config = copy.deepcopy(self.config, memo)
        twin.adapter = self.adapter
        twin.last_stats = copy.deepcopy(self.last_stats, memo)
        twin._local = threading.local()
        twin.keyed = TensorKeyed()
        return twin

    # pickling (``torch.save`` of a patched model): the configuration, adapter and last statistics;
    # per-thread and per-call data start afresh, as in a copy
    def __getstate__(self) -> dict:
        return {"config": self.config, "adapter": self.adapter, "last_stats": self.last_stats}

    def __setstate__(self, values: dict) -> None:
        self.__dict__.update(values)
        self._local = threading.local()
        self.keyed = TensorKeyed()
