"""iLLaVA for ``LlavaOnevisionForConditionalGeneration`` (SigLIP encoder + Qwen2 decoder).

What is patched (``illava.remove`` undoes all of it):
- the SigLIP layers listed in ``encoder_layers`` get ``illava.hf.encoder.IllavaViTLayer`` (the encoder stage);
- the inner ``LlavaOnevisionModel`` gets ``IllavaLlavaOnevisionModel`` (layout of survivors,
  feature calls, placeholder bookkeeping);
- the decoder-side hooks of ``illava.hf.llm`` (the LLM stage).

Unit of removal: a patch. Layout of survivors (the authors reshaped survivors into a fake square
grid; we place every survivor at the patch it came from, its own position):
- base view and single-crop images: survivors in raster order (+ the newline token as stock);
- AnyRes crops: survivors are placed on the full crop grid, those in the padding that stock
  ``unpad_image`` cuts away are dropped, and a newline follows every row of the unpadded grid.
  If the survivors still exceed the stock budget (the ``anyres_max_N`` rule), or would need more
  tokens than stock, they are averaged into the cells of the grid stock would downsample to;
- video frames: stock pools 27x27 -> 14x14 (``ceil(side / 2)``). With K survivors per frame we
  pool into ``ceil(sqrt(K) / 2)`` squared cells over the frame, averaging the survivors in each
  cell, so pooling shrinks the token count by the same factor as stock (361 -> 100 per frame for
  the authors' 92-token removals at four layers). Empty cells give no token.
Features keep the stock count: survivors fill the last slots of each image (each frame's first
slots for videos), the other rows are NaN and are dropped at the decoder input, whose positions are
renumbered as if the prompt had been built with fewer placeholders (the authors' setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import families
from ..hf.encoder import (
    CropTrace,
    FeatureCalls,
    IllavaViTLayer,
    current_call,
    pool_survivors,
    stock_argument,
    unit_trace,
)
from .base import Adapter, require_strategy
from .llava_family import AnyResLayout


class IllavaLlavaOnevisionModel(AnyResLayout, FeatureCalls):
    """LLaVA-OneVision model with iLLaVA's layout of survivors.

    Modifications: the feature calls (``FeatureCalls``); ``pack_image_features`` and
    ``apply_pooling`` lay the survivors out by their source positions (module docstring) at the
    stock feature count. Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        out = stock(self, *args, **kwargs)
        if kind == "video" and call is not None:
            batch, frames = stock_argument(stock, args, kwargs, "pixel_values_videos").shape[:2]
            call.item_crops = [frames] * batch
            call.layout = VideoLayout(batch, frames, out.pooler_output.shape[1])
        return out

    def _illava_units(self, call):
        return self._video_units(call) if call.kind == "video" else super()._illava_units(call)

    # ---------------------------------------------------------------------------- images
    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        def stock(features, newline):
            return super(IllavaLlavaOnevisionModel, self).pack_image_features(
                features, image_sizes, newline, vision_aspect_ratio
            )

        return self._pack_anyres(stock, image_features, image_sizes, image_newline, vision_aspect_ratio)

    # ---------------------------------------------------------------------------- videos
    def apply_pooling(self, image_features):
        call = current_call(self._illava.state)
        trace = call.crop_trace if call is not None else None
        side = self._side()
        frames = image_features.shape[0]
        if call is not None:
            call.crops, call.tokens = frames, frames * side**2
        stock_cells = math.ceil(side / 2) ** 2
        if trace is None:
            return super().apply_pooling(image_features)
        k = image_features.shape[1]
        cells = math.ceil(math.sqrt(k) / 2)
        pooled = image_features.new_full((frames, stock_cells, image_features.shape[-1]), float("nan"))
        slots = []
        for i, (f, p) in enumerate(zip(image_features, trace.positions)):
            means, _, _, slot = pool_survivors(f, p // side, p % side, (side, side), (cells, cells))
            pooled[i, : means.shape[0]] = means
            slots.append(slot)
        call.video_slots = (trace, torch.stack(slots))
        return pooled

    def _video_units(self, call):
        """Units are the patches of every frame; the feature row of a patch is its video's first row
        + its frame's first row + the pooled cell of its survivor (``video_slots``; without an
        encoder stage, the cells stock pooling puts every patch in)."""
        layout, side = call.layout, self._side()
        frames = layout.videos * layout.frames
        if call.video_slots is None:  # no encoder stage: every patch in the cell stock pools it into
            trace = CropTrace.start(frames, side**2, torch.device("cpu"))
            cells = math.ceil(side / 2)
            slots = [
                pool_survivors(p[:, None].float(), p // side, p % side, (side, side), (cells, cells))[3]
                for p in trace.positions
            ]
            call.video_slots = (trace, torch.stack(slots))
        trace, slots = call.video_slots
        frame = torch.arange(frames)
        row = (frame // layout.frames) * layout.per_video + (frame % layout.frames) * math.ceil(side / 2) ** 2
        assign = trace.assign.cpu()
        feature = torch.where(assign >= 0, slots.cpu().gather(1, assign.clamp(min=0)) + row[:, None], -1)
        return unit_trace(trace, [(side, side)] * frames, feature.flatten())


@dataclass(frozen=True)
class VideoLayout:
    """``EncoderCall.layout`` of LLaVA-OneVision's videos: ``videos`` of ``frames`` frames each, and the
    feature rows of one video (``per_video``: its frames' pooled cells)."""

    videos: int
    frames: int
    per_video: int


class LlavaOnevisionAdapter(Adapter):
    record = families.LLAVA_ONEVISION
    model_mixin = IllavaLlavaOnevisionModel
    layer_mixin = IllavaViTLayer

    def check(self, model, config) -> None:
        require_strategy(model, config, "full", "the encoder stage", "every encoder token is a patch")
