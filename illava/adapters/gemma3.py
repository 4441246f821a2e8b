"""iLLaVA for ``Gemma3ForConditionalGeneration`` (Gemma 3: SigLIP-So400m at 896 px + 4x4 average
pooling + a linear projector + the Gemma 3 decoder).

What is patched (``illava.remove`` undoes all of it):
- the SigLIP layers listed in ``encoder_layers`` get ``illava.hf.encoder.IllavaViTLayer`` (the encoder
  stage, ``unit = 16``);
- the inner ``Gemma3Model`` gets ``IllavaGemma3Model`` (layout of survivors, feature calls,
  placeholder bookkeeping, and what the decoder side needs to rebuild Gemma's masks);
- the decoder-side hooks of ``illava.hf.llm`` (the LLM stage).

Gemma 3 encodes every image (and every pan-and-scan crop) as one 896 px square: 64x64 = 4096
SigLIP patches, read at the last layer (after the post-layernorm); the projector averages every
4x4 block of patches (``AvgPool2d``), normalises and projects: 256 LLM tokens per image, framed by
``<start_of_image>`` / ``<end_of_image>`` in the prompt. So:
- unit of removal: a 4x4 block of patches (unit 16), the neighbourhood the pooling folds into one
  LLM token (as Qwen-VL's 2x2 merger blocks, unit 4). SigLIP has absolute position embeddings (added
  before the first layer) and no attention mask, so token order inside the encoder is free: at the
  first merge layer the tokens are reordered block by block (16 consecutive tokens per block) and
  stay so; whole blocks are scored (the mean of their tokens' received attention), removed and
  recycled (their 16 tokens position by position). Layers before the first merge run on the stock
  raster order (their attention maps are stock's);
- layout: every surviving block is pooled exactly as stock pools it (the mean of its 16 tokens),
  normalised and projected, and written at its own block's row of the stock 256 rows; rows of
  removed blocks are NaN (``stock_count_features``) and are dropped at the decoder input, whose
  positions are renumbered as if the prompt had held fewer image tokens (LLaVA-style; Gemma uses
  plain 1D RoPE);
- merges are allowed up to the last SigLIP layer (the model reads the last layer).

Decoder side. Gemma 3 builds its masks in the inner model and hands the decoder one mask per layer
type: image tokens attend to each other both ways within one image (``token_type_ids``; causal
elsewhere), and sliding-window layers (5 of every 6; window 1024) are ``window AND (causal OR
image)``. When tokens are removed, ``illava.hf.masks`` rebuilds them for the shorter sequence from the
2D mask and ``token_type_ids`` this model received (``decoder_masks``): the bidirectional block of
an image is its surviving tokens; sliding windows are measured in *stock* positions (a query attends
to the survivors among the keys the unreduced model's query attends to; counting kept slots instead
would reach further back after every merge), and the scoring query of an LLM merge layer whose
previous layer slides only sees its window. Without ``token_type_ids`` stock is causal everywhere,
and so is illava. Rotary embeddings differ per layer type (local base 10k, global 1M with linear
scaling): survivors get the ones of each layer's type. ``query_key`` needs no override: the default
applies Gemma's ``q_norm`` / ``k_norm`` and its ``scaling`` (``query_pre_attn_scalar``); embedding
scaling happens before the decoder.

Presets (our choice, by the principle of docs/method.md, to be checked by the fidelity harness):
reference Gemma-3-4B (SigLIP 27 layers, 4096 patches = 256 blocks per image; 34 decoder layers). As
for LLaVA-OneVision-7B (layers 5-8 of 26, about half of the tokens) the encoder removes 512 patches
(32 blocks) at each of layers 5-8 (4096 -> 2048 patches, 256 -> 128 LLM tokens per image), and the
LLM keeps 70% of every image's tokens at layer 12, about 30% of the way in (LLaVA-OneVision: 8 of
28), chosen so that the scoring layer 11 is a global-attention layer: a sliding layer's last token
may not see the image at all. Scaled to other depths (Gemma-3-27B: 62 layers), the LLM merge layer
moves to the nearest layer after a global one (27B: 24). Gemma 3 takes no video (no video input in
transformers): ``<video>`` markers are refused and the ``video`` preset is the ``image`` one (as for
LLaVA-1.5).

Pan-and-scan crops need nothing special in the model: every crop is its own 256-token image
(own ``<start_of_image>`` span, own bidirectional block), reduced like an image. The tooling's
``build_inputs`` does not make them (the processor's default, ``do_pan_and_scan=False``).
"""

from __future__ import annotations

import torch

from .. import families
from ..families import GEMMA3_KERNEL as KERNEL
from ..families import gemma3_geometry as geometry
from ..hf.encoder import (
    FeatureCalls,
    GridLayout,
    IllavaViTLayer,
    stock_argument,
    stock_count_features,
    unit_trace,
)
from .base import Adapter


class IllavaGemma3Model(FeatureCalls):
    """Gemma 3 model with iLLaVA's layout of survivors.

    Modifications: ``forward`` remembers the 2D attention mask and ``token_type_ids`` it received
    (the decoder side rebuilds Gemma's masks from them); ``get_image_features`` runs inside an
    encoder call (``FeatureCalls``) and, with the encoder stage, pools and projects the surviving
    blocks into their own rows of the stock 256 (NaN rows for removed blocks, module docstring).
    Disabled: stock.
    """

    _NAMES = ("input_ids", "pixel_values", "attention_mask", "position_ids", "cache", "token_type_ids")

    def forward(self, *args, **kwargs):
        from ..hf.cache import IllavaDynamicCache

        state = self._illava.state
        given = dict(zip(self._NAMES, args), **kwargs)
        cache = given.get("cache", given.get("past_key_values"))
        if not state.config.enabled and not isinstance(cache, IllavaDynamicCache):
            return super().forward(*args, **kwargs)
        with state.scope() as scope:
            scope.model_inputs = {k: given.get(k) for k in ("attention_mask", "token_type_ids")}
            return super().forward(*args, **kwargs)

    def _illava_encode(self, kind, call, stock, args, kwargs):
        state = self._illava.state
        pixel_values = stock_argument(stock, args, kwargs, "pixel_values")
        side, kernel = geometry(self.config)
        blocks = (side // kernel) ** 2
        images = pixel_values.shape[0]
        if call is not None:
            call.crops, call.tokens, call.item_crops = images, images * side * side, [1] * images
        if call is None or not state.config.encoder_active:
            out = stock(self, *args, **kwargs)
            trace = None
        else:
            extra = stock_argument(stock, args, kwargs, "kwargs")
            extra.pop("return_dict", None)
            out = self.vision_tower(pixel_values=pixel_values, return_dict=True, **extra)
            hidden = out.last_hidden_state  # (images, survivors * 16, D) in block order
            proj = self.multi_modal_projector
            pooled = hidden.view(images, -1, kernel * kernel, hidden.shape[-1]).mean(2)  # = AvgPool2d of a block
            features = torch.matmul(proj.mm_soft_emb_norm(pooled), proj.mm_input_projection_weight).type_as(hidden)
            trace = call.crop_trace
            slots = trace.positions if trace is not None else torch.arange(blocks).expand(images, -1)
            out.pooler_output = torch.stack(
                [stock_count_features(f, s.to(f.device), blocks) for f, s in zip(features, slots)]
            )
        if call is not None:
            call.layout = GridLayout(images, (side // kernel, side // kernel))
        return out

    def _illava_units(self, call):
        """Units are the 4x4 blocks of every image in raster order of the block grid; the feature row
        of a block is its image's first row + the block of its survivor."""
        layout = call.layout
        trace = layout.trace(call)
        first = (torch.arange(layout.crops) * (layout.grid[0] * layout.grid[1]))[:, None]
        assign, positions = trace.assign.cpu(), trace.positions.cpu()
        owner = positions.gather(1, assign.clamp(min=0))
        feature = torch.where(assign >= 0, owner + first, -1)
        return unit_trace(trace, [layout.grid] * layout.crops, feature.flatten())


class Gemma3Adapter(Adapter):
    record = families.GEMMA3  # presets: LLM merge layers after a global-attention layer
    model_mixin = IllavaGemma3Model
    layer_mixin = IllavaViTLayer

    def check(self, model, config) -> None:
        from transformers import SiglipVisionModel

        if not config.encoder_layers:
            return
        if not isinstance(model.model.vision_tower, SiglipVisionModel):
            raise ValueError(
                "illava: the Gemma 3 encoder stage needs a SigLIP vision tower; this model's is "
                f"{type(model.model.vision_tower).__name__} (the LLM stage still works)"
            )
        side, kernel = geometry(model.config)
        if kernel != KERNEL or side % kernel:
            raise ValueError(
                f"illava: the Gemma 3 encoder stage removes 4x4 blocks (the pooling of every released Gemma 3); "
                f"this model pools {side}x{side} patches with a {kernel}x{kernel} kernel (the LLM stage still works)"
            )

    def encoder_layers(self, model):
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def decoder_masks(self, scope, kwargs: dict) -> tuple:
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, dict):
            return mask, None
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        given = scope.model_inputs if scope is not None else {}
        types = given.get("token_type_ids")
        blocks = get_block_sequence_ids_for_mask(types) if types is not None else None
        return given.get("attention_mask"), blocks
