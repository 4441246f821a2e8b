"""iLLaVA for ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP ViT-L/14-336 + MLP projector + Vicuna).

What is patched (``illava.remove`` undoes all of it):
- the CLIP layers listed in ``encoder_layers`` get ``illava.hf.encoder.IllavaViTLayer`` (the encoder stage);
- the inner ``LlavaModel`` gets ``IllavaLlavaModel`` (layout of survivors, feature calls,
  placeholder bookkeeping);
- the decoder-side hooks of ``illava.hf.llm`` (the LLM stage).

LLaVA-1.5 encodes one 336 px view per image (the processor pads the image to a square and resizes
it): a CLS token and 24x24 patches. The model reads the hidden states of the penultimate layer
(``vision_feature_layer=-2``), drops the CLS token (``vision_feature_select_strategy="default"``)
and maps every patch to one LLM token with a 2-layer MLP: 576 tokens per image. So:
- unit of removal: one patch; the CLS token (index 0) is never removed and never absorbs removed
  tokens (``keep_first = 1``);
- scoring: the attention a token receives from *all* tokens of its image, the CLS token's query
  included, averaged over heads and queries (the paper's definition; the CLS query is not singled
  out, since the features LLaVA reads are the patches, not the CLS token);
- merge layers must come no later than the layer the model reads: with ``vision_feature_layer=-2``
  on a 24-layer CLIP that is layer 22 (``dimensions().feature_layer``); a merge at the last layer
  would change nothing the model reads, and is refused by the configuration check;
- layout: the selected hidden state holds the CLS token then the survivors in their source order;
  after the projector the survivors fill the *last* rows of the image's stock feature count (the
  prompt's last placeholder stays a real token), the other rows are NaN and are dropped at the
  decoder input, whose positions are renumbered as if the prompt had been built with fewer
  placeholders (as for LLaVA-OneVision). With ``vision_feature_select_strategy="full"`` the CLS
  feature is kept and stays in the first row (577 rows per image).

The encoder stage needs a CLIP vision tower (the LLaVA-1.5 releases) or a DINOv2 one (``Dinov2Model``,
``Dinov2WithRegistersModel``: ``illava.hf.encoder.IllavaDinov2Layer``, layer scales as stock; the CLS
token and the register tokens are never removed, ``keep_first = 1 + registers``, and with the
``default`` strategy the registers stay features before the patches, as stock reads them); other
towers the ``llava`` model type allows (SigLIP, Pixtral) are refused for the encoder stage, the LLM
stage works on all.

Presets (our choice, by the principle of docs/method.md, to be checked by the fidelity harness):
as for LLaVA-OneVision-7B (SigLIP, 26 layers: 92 of 729 patches removed at each of layers 5-8, about
half of the tokens) the encoder removes 72 of LLaVA-1.5-7B's 576 patches at each of CLIP-L's
layers 5-8 (24 layers; 576 -> 288), and the LLM keeps 70% of every image's tokens at layer 9 of
Vicuna-7B's 32 (LLaVA-OneVision: 8 of 28). LLaVA-1.5 takes no video: ``video`` is the ``image``
preset. Depths and removals scale to LLaVA-1.5-13B (Vicuna-13B, 40 layers: LLM layer 11) and to
other CLIP sizes.
"""

from __future__ import annotations

import torch

from .. import families
from ..hf.encoder import (
    FeatureCalls,
    GridLayout,
    IllavaViTLayer,
    stock_argument,
    stock_count_features,
    unit_trace,
)
from .base import Adapter
from .llava_family import VIT_TOWERS, fit_to_tower, registers, require_tower


def patch_side(config) -> int:
    vc = config.vision_config
    return vc.image_size // vc.patch_size


def patch_grid(config, pixel_values: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of patches of the images the tower gets (a DINOv2 tower interpolates its
    positions: the images need not be ``image_size``)."""
    ps = config.vision_config.patch_size
    return pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps


def cls_rows(config, strategy: str | None = None) -> int:
    """Feature rows of the CLS token per image: 1 for ``full``, 0 for ``default`` (dropped)."""
    return 1 if (strategy or config.vision_feature_select_strategy) == "full" else 0


def head_rows(config, strategy: str | None = None) -> int:
    """Feature rows per image before the patches: the CLS token's (``cls_rows``) and a DINOv2
    tower's register tokens (stock ``default`` drops only the first token, the CLS)."""
    return cls_rows(config, strategy) + registers(config.vision_config)


class IllavaLlavaModel(FeatureCalls):
    """LLaVA model with iLLaVA's layout of survivors.

    Modifications: the feature call (``FeatureCalls``) writes the survivors' features into the stock
    feature count (NaN rows for removed patches, module docstring). Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        pixel_values = stock_argument(stock, args, kwargs, "pixel_values")
        grid = patch_grid(self.config, pixel_values)
        patches = grid[0] * grid[1]
        if call is not None:
            images = pixel_values.shape[0]
            call.crops, call.item_crops = images, [1] * images
            call.tokens = images * (self._illava.keep_first + patches)
        out = stock(self, *args, **kwargs)
        head = head_rows(self.config, stock_argument(stock, args, kwargs, "vision_feature_select_strategy"))
        trace = call.crop_trace if call is not None else None
        if trace is not None:
            total = head + patches
            laid = []
            for f in out.pooler_output:  # (head + survivors, D) per image, source order
                kept = f.shape[0] - head
                slots = torch.cat([torch.arange(head), torch.arange(total - kept, total)]).to(f.device)
                laid.append(stock_count_features(f, slots, total))
            out.pooler_output = laid
        if call is not None:
            call.layout = GridLayout(pixel_values.shape[0], grid, head)
        return out

    def _illava_units(self, call):
        """Units are the patches of every image in raster order; the feature row of a patch is its
        image's first row + the rows before the patches (``head_rows``) + the slot of its survivor
        (the survivors fill the last rows, in source order)."""
        layout = call.layout
        trace = layout.trace(call)
        total = layout.head + layout.grid[0] * layout.grid[1]
        kept = trace.positions.shape[1]
        first = (torch.arange(layout.crops) * total + total - kept)[:, None]
        assign = trace.assign.cpu()
        feature = torch.where(assign >= 0, assign + first, -1)
        return unit_trace(trace, [layout.grid] * layout.crops, feature.flatten())


class LlavaAdapter(Adapter):
    record = families.LLAVA  # keep_first: CLIP's CLS token (DINOv2: CLS + registers, ``for_model``)
    model_mixin = IllavaLlavaModel
    layer_mixin = IllavaViTLayer

    def encoder_layers(self, model):
        encoder = self.parts(model).vision.encoder
        return encoder.layers if hasattr(encoder, "layers") else encoder.layer  # CLIP; DINOv2

    def for_model(self, model):
        return fit_to_tower(self, model)  # a DINOv2 tower: its layer mixin, CLS + registers kept

    def check(self, model, config) -> None:
        require_tower(model, config, "LLaVA", tuple(VIT_TOWERS))
