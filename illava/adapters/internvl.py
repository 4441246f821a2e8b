"""iLLaVA for ``InternVLForConditionalGeneration`` (InternViT + any decoder the config names).

InternVL tiles an image into 448 px crops plus a thumbnail (dynamic tiling by the processor; a
video is one tile per frame). InternViT encodes every tile as a CLS token and 32x32 patches; a
pixel shuffle folds every 2x2 block of patches into one LLM token (256 per tile). So:
- unit of removal: a 2x2 block, aligned as the pixel shuffle aligns them; the CLS token is never
  removed (``unit = 4``, ``keep_first = 1``). At the first merge layer the patch tokens
  are reordered so that every block is 4 consecutive tokens (attention does not depend on token
  order; positions were added at the embeddings);
- scoring per tile: the attention a token receives from its own tile (the CLS token's included);
- layout: after the last encoder layer the survivors go back to their own patch positions on the
  raster grid of the tile (zeros where blocks were removed), and stock code runs unchanged: the
  pixel shuffle folds every surviving block exactly as stock folds it, and the projector maps it;
  the features of removed blocks are then set to NaN (after the projector, so that no weight sees a
  NaN, also in training), and the decoder input drops them. Positions are renumbered as if the
  prompt had been built with fewer placeholders (as for LLaVA-OneVision).

The encoder stage needs ``vision_feature_layer=-1`` (the InternVL releases' setting): hidden
states of earlier layers are in block order and shortened.

Presets (our choice, by the principle of docs/method.md, to be checked by the fidelity harness):
about half of every tile's blocks removed in the encoder from a fifth of its depth on (InternViT-300M,
24 layers: 32 blocks at each of layers 5-8, 256 -> 128 blocks per tile), and 30% of each image's
tokens in the LLM at 28% of its depth (layer 9 of 32); video: layers 3-6 and LLM layer 2, as the
authors chose for LLaVA-OneVision video. Depths and removals scale to InternViT-6B (45 layers) and
to every decoder from 0.5B to 72B.
"""

from __future__ import annotations

import torch

from .. import families
from ..families import internvl_patch_side as patch_side
from ..hf.encoder import (
    FeatureCalls,
    GridLayout,
    PassMergeInputs,
    attention_and_scores,
    current_call,
    merge_inputs,
    merge_layer,
    proportional_bias,
    scores_from_cls,
    stock_argument,
    unit_trace,
)
from ..patch import Hook
from ..plan import encoder as plan
from .base import Adapter, require_strategy


def block_order(side: int, device=None) -> torch.Tensor:
    """``(side // 2)**2`` blocks x 4: the raster patch index of every patch of every block (blocks in
    raster order, the pixel shuffle's output order)."""
    return plan.block_order(side, 2, device).view(-1, 4)


class IllavaInternVisionLayer:
    """InternViT layer with the encoder stage.

    Modifications: the attention runs with explicit softmax to obtain the attention each token
    receives; after the first (layer-scaled) residual and before the MLP, whole 2x2 blocks are
    removed and recycled per tile (the CLS token stays). The first merge layer puts the patch tokens
    in block order after its attention. Disabled: stock forward.
    """

    _illava_pre_hook = PassMergeInputs  # what the layer reads from its encoder call, checkpointed with it

    def forward(self, hidden_states, **kwargs):
        patch = self._illava
        state = patch.state
        inputs = merge_inputs(state, kwargs)
        if not state.config.encoder_active:
            return super().forward(hidden_states, **kwargs)
        attn = self.attention
        hidden = self.layernorm_before(hidden_states)
        b, n, _ = hidden.shape
        q, k = attn.q_norm(attn.q_proj(hidden)), attn.k_norm(attn.k_proj(hidden))
        v = attn.v_proj(hidden)
        q, k, v = (t.reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        bias = proportional_bias(state, n, patch.unit, patch.keep_first, inputs.trace)
        cls = scores_from_cls(state, patch.keep_first)
        out, received, projected = attention_and_scores(
            attn, hidden, q, k, v, attn.scale, lambda: attn(hidden), bias, cls, inputs.scores, inputs.collecting
        )
        if not projected:
            out = attn.projection_dropout(attn.projection_layer(out.reshape(b, n, -1)))
        hidden = merge_layer(
            state, patch.layer, hidden_states + self.lambda_1 * out, received, k.mean(1), inputs.trace,
            patch.unit, patch.keep_first,
        )  # fmt: skip
        layer_output = self.dropout(self.mlp(self.layernorm_after(hidden)))
        if self.lambda_2 is not None:
            layer_output = self.lambda_2 * layer_output
        return layer_output + hidden


class RasterSurvivors(Hook):
    """Forward hook on the InternViT encoder: survivors back at their own patch positions of the
    tile's raster grid, zeros for the patches of removed blocks (stock pixel shuffle follows)."""

    def __init__(self, state, side: int):
        super().__init__(state)
        self.side = side

    def __call__(self, module, args, kwargs, output):
        call = current_call(self.state)
        trace = call.crop_trace if call is not None else None
        if trace is None:
            return None
        hidden = output.last_hidden_state  # (tiles, 1 + 4 * kept blocks, D), block order
        tiles, _, dim = hidden.shape
        side = self.side
        patches = block_order(side, hidden.device)[trace.positions.to(hidden.device)].flatten(1)  # (tiles, 4k)
        full = hidden.new_zeros((tiles, 1 + side * side, dim))
        full[:, 0] = hidden[:, 0]
        full = full.scatter(1, (patches + 1)[..., None].expand(-1, -1, dim), hidden[:, 1:])
        output.last_hidden_state = full
        call.kept_blocks = trace.positions
        return output


class IllavaInternVLModel(FeatureCalls):
    """InternVL model: the feature call (``FeatureCalls``) counts crops per tile, sets the features
    of removed blocks to NaN and records the source tracking. Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        pixel_values = stock_argument(stock, args, kwargs, "pixel_values")
        side = patch_side(self.config)
        if call is not None:
            call.crops, call.tokens = pixel_values.shape[0], pixel_values.shape[0] * (1 + side * side)
        out = stock(self, *args, **kwargs)
        kept = call.kept_blocks if call is not None else None
        if kept is not None:  # the features of removed blocks: NaN rows, dropped at the decoder input
            features = out.pooler_output
            removed = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
            removed.scatter_(1, kept.to(features.device), False)
            out.pooler_output = features.masked_fill(removed[..., None], float("nan"))
        if call is not None:
            call.layout = GridLayout(pixel_values.shape[0], (side // 2, side // 2))
        return out

    def _illava_units(self, call):
        """Units are the blocks of every tile in raster order; the feature row of a block is its
        tile's first row + the block's raster index (the pixel shuffle's order)."""
        layout = call.layout
        trace = layout.trace(call)
        rows = torch.arange(layout.crops)[:, None] * (layout.grid[0] * layout.grid[1])
        assign = trace.assign.cpu()
        feature = torch.where(assign >= 0, trace.positions.cpu().gather(1, assign.clamp(min=0)) + rows, -1)
        return unit_trace(trace, [layout.grid] * layout.crops, feature.flatten())


class InternVLAdapter(Adapter):
    record = families.INTERNVL  # keep_first: InternViT's CLS token
    model_mixin = IllavaInternVLModel
    layer_mixin = IllavaInternVisionLayer

    def check(self, model, config) -> None:
        if config.encoder_layers and model.config.vision_feature_layer != -1:
            raise ValueError(
                "illava: the InternVL encoder stage needs vision_feature_layer=-1 (hidden states of earlier layers "
                f"are in block order and shortened); this model reads layer {model.config.vision_feature_layer}"
            )
        why = "the CLS token dropped before the pixel shuffle"
        require_strategy(model, config, "default", "the InternVL encoder stage", why)

    def encoder_layers(self, model):
        return model.model.vision_tower.encoder.layer

    def patch_more(self, model, record) -> None:
        if record.state.config.encoder_layers:
            survivors = RasterSurvivors(record.state, patch_side(model.config))
            record.hook(model.model.vision_tower.encoder, survivors, "post")

    def item_lengths(self, kind: str, output) -> list[int] | None:
        return None  # features are per tile: an image is a run of placeholders
