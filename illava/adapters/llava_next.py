"""iLLaVA for ``LlavaNextForConditionalGeneration`` (LLaVA-1.6: CLIP ViT-L/14-336 + MLP projector +
Vicuna / Mistral / Nous-Hermes, AnyRes images).

What is patched (``illava.remove`` undoes all of it):
- the CLIP layers listed in ``encoder_layers`` get ``illava.hf.encoder.IllavaViTLayer`` (the encoder stage,
  shared with LLaVA-1.5: the CLS token is never removed, scores come from all tokens);
- the inner ``LlavaNextModel`` gets ``IllavaLlavaNextModel`` (layout of survivors, feature calls,
  placeholder bookkeeping);
- the decoder-side hooks of ``illava.hf.llm`` (the LLM stage).

LLaVA-1.6 encodes every image as a 336 px base view plus 336 px crops on a grid chosen from
``image_grid_pinpoints`` (AnyRes). Every view is a CLS token and 24x24 patches; the model reads
the penultimate layer (``vision_feature_layer=-2``) without the CLS token (strategy ``default``),
then ``pack_image_features`` lays the crops out as one patch grid, cuts the padding rows / columns
the processor added (``unpad_image``) and appends an ``image_newline`` token after every row of the
unpadded grid; the base view comes first, without newlines. So:
- unit of removal: one patch per view (the same removal in the base view and in every crop); the
  CLS token (index 0) is never removed (``keep_first = 1``);
- merge layers must come no later than the layer the model reads (``dimensions().feature_layer``:
  22 for CLIP-L with ``-2``);
- layout (``AnyResLayout``, shared with LLaVA-OneVision): base-view survivors in raster order;
  crop survivors placed at their own patch on the full crop grid, those in the padding stock
  unpadding cuts off dropped, a newline after every row of the unpadded grid (rows left empty
  included). LLaVA-NeXT has no ``anyres_max_N`` budget: survivors never exceed the stock count, so
  nothing is ever pooled. Features keep the stock count: the survivors fill the image's last rows,
  the other rows are NaN and are dropped at the decoder input, whose positions are renumbered as if
  the prompt had been built with fewer placeholders.

The encoder stage needs a CLIP vision tower read with ``vision_feature_select_strategy='default'``
(the LLaVA-1.6 releases): with ``full`` stock ``pack_image_features`` cannot lay CLIP's 577 tokens
per crop out as a grid. The LLM stage works on all.

Presets (our choice, by the same principle as LLaVA-1.5-7B, to be checked by the fidelity harness):
72 of 576 patches removed in every view (base and crops) at each of CLIP-L's layers 5-8
(576 -> 288 per view), the LLM keeps 70% of every image's tokens at layer 9 of Vicuna-7B's 32.
LLaVA-NeXT (this class) takes no video: ``video`` is the ``image`` preset.
"""

from __future__ import annotations

from .. import families
from ..hf.encoder import FeatureCalls, IllavaViTLayer
from .base import Adapter, require_strategy
from .llava_family import AnyResLayout, require_clip


class IllavaLlavaNextModel(AnyResLayout, FeatureCalls):
    """LLaVA-NeXT model with iLLaVA's layout of survivors.

    Modifications: the feature call (``FeatureCalls``); ``pack_image_features`` lays the survivors
    out by their source positions (module docstring) at the stock feature count. Disabled: stock.
    """

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        def stock(features, newline):
            return super(IllavaLlavaNextModel, self).pack_image_features(
                features, image_sizes, vision_feature_select_strategy, newline
            )

        return self._pack_anyres(stock, image_features, image_sizes, image_newline, None)


class LlavaNextAdapter(Adapter):
    record = families.LLAVA_NEXT
    model_mixin = IllavaLlavaNextModel
    layer_mixin = IllavaViTLayer

    def check(self, model, config) -> None:
        require_clip(model, config, "LLaVA")  # the same CLIP encoder stage as LLaVA-1.5
        require_strategy(model, config, "default", "the LLaVA-NeXT encoder stage", "the CLS token dropped")
