"""iLLaVA for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``.

Qwen3-VL's vision transformer is Qwen2-VL's (packed frames, ``cu_seqlens`` per frame, a patch
merger folding every 2x2 block of 4 consecutive tokens into one LLM token, full attention in every
block), so the encoder stage and the layout of survivors are ``illava.adapters.qwen_vl``'s: whole
2x2 blocks are removed per frame, the merger output is written back at the stock count (NaN rows),
the decoder input gathers the survivors' own interleaved M-RoPE positions (the rotary embedding
interleaves the (t, h, w) sections per token: gathering whole rows keeps it exact). The MoE variant
shares every module this adapter touches (only the decoder MLP differs).

**Deepstack.** The hidden states of a few vision blocks (``deepstack_visual_indexes``, 8, 16, 24 of
27 for the 8B) each go through their own merger, and the results are added to the hidden states
of the first decoder layers' outputs at the visual positions. With the encoder stage they follow
the main tokens exactly:

- the hidden states taken at block ``d`` are those of the blocks present after every merge up to
  ``d`` (merges at or before ``d`` act on them as on the main stream);
- every later merge removes the same blocks from them and recycles them with the same weights as
  the main tokens (the policy's combination, probed with an identity appended to the blocks:
  ``qwen_vl._merge_blocks``; no gradient flows through these weights);
- the deepstack mergers run once, at the end of the vision call, on the survivors, and their output
  is written back at the stock count with NaN rows where the main features are NaN (the feature
  stage's selection too), so stock code splits and joins them unchanged;
- at the decoder input, ``gather_decoder_inputs`` drops the visual positions whose slot was removed
  from ``visual_pos_masks`` and the matching deepstack rows; after an LLM merge layer, the deepstack
  features added at later layers follow the kept tokens (gathered, not recycled: a token the LLM
  stage removes takes its deepstack features with it).

Videos: Qwen3-VL's processor separates the frames of a video with timestamps (``<t seconds>
<|vision_start|> frame <|vision_end|>``) and positions each temporal patch as a separate grid;
the tooling's ``build_inputs`` (``illava.tools.families.qwen3_vl``) delimits every temporal patch
with its own ``<|vision_start|>`` / ``<|vision_end|>`` (no timestamp text).
"""

from __future__ import annotations

import torch

from .. import families
from ..hf.encoder import current_call, stock_argument, stock_count_features
from ..hf.llm import merged_sequence
from ..patch import Hook
from ..plan.llm import gather_seq
from .qwen_vl import IllavaQwenVLModel, QwenVLAdapter


class IllavaQwen3VLModel(IllavaQwenVLModel):
    """Qwen3-VL model: as Qwen2-VL's, and the deepstack features of removed tokens are NaN too.

    Modifications: after the feature call, deepstack rows are set to NaN where the main feature row
    is NaN (the feature stage selects among the main features only); videos run in one feature call
    (stock's ``get_video_features`` calls ``get_image_features``). Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        if kind == "video":  # stock runs videos through ``self.get_image_features``: one call, not nested
            videos, grid, extra = (
                stock_argument(stock, args, kwargs, name)
                for name in ("pixel_values_videos", "video_grid_thw", "kwargs")
            )
            return self._illava_original.get_image_features(self, videos, grid, **extra)
        return stock(self, *args, **kwargs)

    def _illava_finish(self, kind, output):
        return _mask_deepstack(output)


def _mask_deepstack(output):
    features, deepstack = getattr(output, "pooler_output", None), getattr(output, "deepstack_features", None)
    if getattr(output, "illava_call", None) is None or not deepstack or not isinstance(features, (list, tuple)):
        return output
    removed = [f[:, 0].isnan() for f in features]
    if not any(r.any() for r in removed):
        return output
    output.deepstack_features = [
        type(layer)(d.masked_fill(r[:, None].to(d.device), float("nan")) for d, r in zip(layer, removed))
        for layer in deepstack
    ]
    return output


class IllavaDeepstackMerger:
    """A deepstack merger during the encoder stage: its input (the hidden states after block ``d``)
    is kept for later merges and the merger runs at the end of the call (``FinishDeepstack``).
    Disabled, or outside a feature call: stock forward."""

    def forward(self, x):
        state = self._illava.state
        call = current_call(state) if state.config.encoder_active else None
        run = call.vision_run if call is not None else None
        if run is None:
            return super().forward(x)
        run.companions[self._illava.layer] = (x, len(run.steps))
        return x[:0]  # a placeholder: FinishDeepstack writes the features of the call

    def stock_forward(self, x):
        return super().forward(x)


class FinishDeepstack(Hook):
    """Forward hook on the vision transformer: the deepstack features of the survivors, after every
    merge of the call, at the stock number of LLM tokens (NaN rows for removed blocks)."""

    def __call__(self, module, args, kwargs, output):
        call = current_call(self.state)
        run = call.vision_run if call is not None else None
        if run is None or not run.companions:
            return None
        total = sum(int(t * h * w) for t, h, w in run.grid_thw.tolist()) // run.unit
        blocks = run.last()
        features = []
        for i in sorted(run.companions):
            hidden, first = run.companions[i]
            x = hidden.reshape(-1, run.unit * hidden.shape[-1])
            for count, groups in run.steps[first:]:
                new = x.new_zeros(count, x.shape[-1])
                for index, rows, weights in groups:
                    old = x[index.to(x.device)].float()
                    new = new.index_put(
                        (rows.flatten().to(x.device),), (weights.float() @ old).flatten(0, 1).to(x.dtype)
                    )
                x = new
            out = module.deepstack_merger_list[i].stock_forward(x.reshape(-1, hidden.shape[-1]))
            if blocks is not run.initial:
                out = stock_count_features(out, blocks.block_ids.to(out.device), total)
            features.append(out)
        run.companions.clear()
        output.deepstack_features = features
        return output


class IllavaQwen3TextModel:
    """Qwen3-VL decoder: the deepstack features added after a layer follow the tokens the LLM stage
    kept before it. Modifications: ``_deepstack_process`` gathers the visual mask and the deepstack
    rows of the current (shorter) sequence. Disabled, or no LLM merge so far in this call: stock."""

    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        seq = merged_sequence(self._illava.state)
        if seq is not None and seq.index.shape[1] == hidden_states.shape[1]:
            index = seq.index.to(visual_pos_masks.device)
            order = (visual_pos_masks.flatten().long().cumsum(0) - 1).view(visual_pos_masks.shape)
            picked = visual_pos_masks.gather(1, index) & seq.mask.to(index.device)
            rows = order.gather(1, index)[picked]
            visual_pos_masks, visual_embeds = picked, visual_embeds[rows.to(visual_embeds.device)]
        return super()._deepstack_process(hidden_states, visual_pos_masks, visual_embeds)


class Qwen3VLAdapter(QwenVLAdapter):
    record = families.QWEN3_VL  # presets: Qwen2-VL-7B's relative depths in Qwen3-VL-8B
    model_mixin = IllavaQwen3VLModel

    def check(self, model, config) -> None:
        super().check(model, config)
        depth = model.config.vision_config.depth
        bad = [layer for layer in config.encoder_layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"IllavaConfig.encoder_layers: Qwen3-VL has vision blocks 0-{depth - 1}; got {bad}")

    def patch_more(self, model, record) -> None:
        super().patch_more(model, record)
        inner = model.model
        visual = inner.visual
        state = record.state
        record.swap(inner.language_model, IllavaQwen3TextModel)
        if state.config.encoder_layers:
            for i, merger in enumerate(visual.deepstack_merger_list):
                record.swap(merger, IllavaDeepstackMerger, layer=i)
            record.hook(visual, FinishDeepstack(state), "post")

    def gather_decoder_inputs(self, kwargs: dict, index: torch.Tensor) -> None:
        """``visual_pos_masks`` and ``deepstack_visual_embeds`` of the kept tokens. A slot of
        ``index`` holds a visual token if the stock mask says so there and its deepstack row is
        not NaN (removed tokens' rows are NaN; padding slots point at removed or padding tokens)."""
        mask, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if mask is None:
            return
        mask = mask.to(index.device)
        order = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)
        picked = gather_seq(mask, index)
        rows = gather_seq(order, index)[picked]
        if embeds:
            present = ~embeds[0][rows.to(embeds[0].device), 0].isnan().to(index.device)
            kept = picked.clone()
            kept[picked] = present
            picked = kept
            rows = rows[present]
            embeds = [e[rows.to(e.device)] for e in embeds]
        kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = picked, embeds
