"""Pieces shared by the LLaVA-style families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision; their
dimensions are their records', ``illava.families.vit_dimensions``): the vision towers of the encoder stage (CLIP;
DINOv2 for LLaVA-1.5) and their check, and the AnyRes layout of survivors (a base view + crops on a
grid: LLaVA-NeXT and LLaVA-OneVision)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as mlo

from ..families import registers  # noqa: F401 - the tools and tests read it here
from ..hf.encoder import (
    CropTrace,
    IllavaDinov2Layer,
    IllavaViTLayer,
    current_call,
    pool_survivors,
    rows_with_newlines,
    stock_count_features,
    unit_trace,
)

# vision towers of the encoder stage: tower class -> (layer mixin, what the error message calls it)
VIT_TOWERS = {
    "CLIPVisionModel": (IllavaViTLayer, "CLIP"),
    "Dinov2Model": (IllavaDinov2Layer, "DINOv2"),
    "Dinov2WithRegistersModel": (IllavaDinov2Layer, "DINOv2"),
}


def tower_class(model) -> str:
    """The class name of a LLaVA-style model's vision tower."""
    return type(model.model.vision_tower).__name__


def fit_to_tower(adapter, model):
    """``adapter`` fitted to a LLaVA-style model's vision tower: DINOv2's layer mixin, and CLS +
    register tokens kept (``keep_first``); ``adapter`` itself for CLIP and towers it cannot run."""
    kind = tower_class(model)
    if kind not in VIT_TOWERS or kind == "CLIPVisionModel":
        return adapter
    fitted = copy.copy(adapter)
    fitted.layer_mixin = VIT_TOWERS[kind][0]
    fitted.keep_first = adapter.record.keep_first_of(model.config)  # CLS + registers
    return fitted


def require_tower(model, config, family: str, towers: tuple[str, ...] = ("CLIPVisionModel",)) -> None:
    """The encoder stage (``IllavaViTLayer`` and its DINOv2 form, CLS and registers kept) needs one of
    the vision towers ``towers`` (classes of ``VIT_TOWERS``); ``ValueError`` naming them otherwise."""
    kind = tower_class(model)
    if config.encoder_layers and kind not in towers:
        names = " or ".join(dict.fromkeys(VIT_TOWERS[t][1] for t in towers))
        raise ValueError(
            f"illava: the {family} encoder stage needs a {names} vision tower; this model's is "
            f"{type(model.model.vision_tower).__name__} (the LLM stage still works)"
        )


def require_clip(model, config, family: str) -> None:
    """The CLIP encoder stage (``IllavaViTLayer`` with a CLS token) needs a CLIP vision tower."""
    require_tower(model, config, family)


class AnyResLayout:
    """Layout of the survivors of AnyRes images (a base view + crops on a grid), shared by the
    LLaVA-OneVision and LLaVA-NeXT model mixins (their stock ``pack_image_features`` differ only in
    signature and in OneVision's ``anyres_max_N`` budget; ``get_anyres_image_grid_shape`` and
    ``unpad_image`` are the same code in both modules). Survivors are placed on the full crop grid,
    those in the padding stock ``unpad_image`` cuts away are dropped, and a newline follows every
    row of the unpadded grid (module docstring).
    """

    def _side(self) -> int:
        return self.config.vision_config.image_size // self.config.vision_config.patch_size

    def _pack_anyres(self, stock, image_features, image_sizes, image_newline, aspect):
        """``pack_image_features`` with the survivors laid out (class docstring); ``stock(features,
        newline)`` is the stock ``pack_image_features`` of the model with its other arguments bound."""
        call = current_call(self._illava.state)
        if call is None:
            return stock(image_features, image_newline)
        side = self._side()
        crops = [f.shape[0] for f in image_features]
        per_crop = self._illava.keep_first + side**2
        call.crops, call.tokens, call.item_crops = sum(crops), sum(crops) * per_crop, crops
        trace = call.crop_trace
        # stock counts from stock code run on one-channel zeros (cheap, and always in sync)
        dummy = [f.new_zeros(f.shape[0], side**2, 1) for f in image_features]
        newline = image_newline[:1] if image_newline is not None else None
        _, stock_lens = stock(dummy, newline)
        if trace is None:  # no encoder stage: stock features
            packed, lens = stock(image_features, image_newline)
        else:
            packed, lens = [], stock_lens
            positions = torch.split(trace.positions, crops, dim=0)
            for f, p, size, n in zip(image_features, positions, image_sizes, stock_lens.tolist()):
                tokens, _ = self._pack_survivors(f, p, size, image_newline, aspect, n)
                slots = torch.arange(n - tokens.shape[0], n, device=tokens.device)  # survivors last: the prompt's
                packed.append(stock_count_features(tokens, slots, n))  # last token stays a real one
        call.layout = AnyResImages(image_sizes, stock_lens, image_newline is not None, aspect)
        return packed, lens

    def _pack_survivors(self, feature, positions, image_size, newline, aspect, stock: int):
        """Survivors laid out by their source positions, and the token of every survivor of every
        crop ``(crops, K)`` (-1: cut by the unpadding); at most ``stock`` tokens."""
        side = self._side()
        base = feature[0]
        crops, k, dim = feature.shape
        slots = torch.full((crops, k), -1, dtype=torch.long, device=feature.device)
        slots[0] = torch.arange(k, device=feature.device)
        if crops == 1:
            return (torch.cat([base, newline[None].to(base)]) if newline is not None else base), slots
        grid_h, grid_w = mlo.get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        crops -= 1
        crop = torch.arange(crops, device=feature.device)[:, None].expand(crops, k)
        rows = (crop // grid_w) * side + positions[1:] // side
        cols = (crop % grid_w) * side + positions[1:] % side
        # the window stock unpad_image keeps, found by running it on a grid of row/col indices
        height, width = grid_h * side, grid_w * side
        index = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
        window = mlo.unpad_image(index, image_size)
        unpad_h, unpad_w = window.shape[1:]
        top = int(window[0, 0, 0]) if unpad_h and unpad_w else 0
        left = int(window[1, 0, 0]) if unpad_h and unpad_w else 0
        rows, cols = rows.flatten() - top, cols.flatten() - left
        inside = (rows >= 0) & (rows < unpad_h) & (cols >= 0) & (cols < unpad_w)
        tokens, rows, cols = feature[1:].reshape(-1, dim)[inside], rows[inside], cols[inside]
        slot = torch.arange(tokens.shape[0], device=feature.device)  # output token of each survivor inside
        budget = int(aspect.removeprefix("anyres_max_")) * side**2 if aspect else None  # None: no budget
        newlines = newline is not None
        too_many = k + tokens.shape[0] + (unpad_h if newlines else 0) > stock
        if (budget is not None and math.sqrt(tokens.shape[0] / budget) > 1.1) or too_many:
            ratio = math.sqrt(unpad_h * unpad_w / budget) if budget is not None else 1.0
            cells = (
                (max(1, int(unpad_h // ratio)), max(1, int(unpad_w // ratio))) if ratio > 1.1 else (unpad_h, unpad_w)
            )
            tokens, rows, cols, slot = pool_survivors(tokens, rows, cols, (unpad_h, unpad_w), cells)
            num_rows = cells[0]
        else:
            order = torch.argsort(rows * unpad_w + cols)
            tokens, rows, cols = tokens[order], rows[order], cols[order]
            slot[order] = torch.arange(order.numel(), device=order.device)
            num_rows = unpad_h
        if newlines:
            tokens, where = rows_with_newlines(tokens, rows, cols, num_rows, newline)
            slot = where[slot]
        crop_slots = torch.full((crops * k,), -1, dtype=torch.long, device=feature.device)
        crop_slots[inside] = slot + k
        slots[1:] = crop_slots.view(crops, k)
        return torch.cat([base, tokens]), slots

    def _illava_units(self, call):
        """Units are the patches of every crop; the feature row of each is where ``_pack_survivors``
        laid its survivor out (run again on the call's trace, with one-channel zeros)."""
        side, layout = self._side(), call.layout
        trace = call.crop_trace or CropTrace.start(sum(call.item_crops), side**2, torch.device("cpu"))
        newline = torch.zeros(1) if layout.newline else None
        rows, start, offset = [], 0, 0
        for crops, size, n in zip(call.item_crops, layout.image_sizes.cpu(), layout.stock_lens.tolist()):
            positions = trace.positions[start : start + crops].cpu()
            dummy = torch.zeros(crops, positions.shape[1], 1)
            packed, slots = self._pack_survivors(dummy, positions, size, newline, layout.aspect, n)
            if call.crop_trace is None and packed.shape[0] != n:
                slots = torch.full_like(slots, -1)  # stock pooled by interpolation: no exact mapping
            slots = torch.where(slots >= 0, slots + offset + n - packed.shape[0], -1)
            assign = trace.assign[start : start + crops].cpu()
            rows.append(torch.where(assign >= 0, slots.gather(1, assign.clamp(min=0)), -1))
            start, offset = start + crops, offset + n
        grids = [(side, side)] * trace.assign.shape[0]
        return unit_trace(trace, grids, torch.cat(rows).flatten())


@dataclass(frozen=True)
class AnyResImages:
    """``EncoderCall.layout`` of AnyRes images: what ``pack_image_features`` was given (the image
    sizes, whether a newline follows each row, the ``anyres_max_N`` budget) and the stock feature
    count of every image."""

    image_sizes: torch.Tensor
    stock_lens: torch.Tensor
    newline: bool
    aspect: str | None
