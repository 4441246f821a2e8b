"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) in vLLM with the encoder stage.

- Unit of removal: a 2x2 block of patches (the patch merger folds it into one LLM token), scored and
  removed per frame, as the transformers backend does (``illava.adapters.qwen_vl``): an image of
  ``h x w`` blocks keeps ``units_after(h * w, (h, w))`` of them, which the processor reserves.
- The vision tower runs stock blocks on the packed sequence; a merge block attends frame by frame
  with explicit softmax (the attention every token receives), reduces its blocks with
  ``illava.plan.encoder.reduce_units``, and hands later blocks the survivors' ``cu_seqlens`` and
  rotary embeddings.
- M-RoPE: survivors keep their own (t, h, w) positions and the text after an image keeps its stock
  positions, as in the transformers backend. vLLM assigns positions before the model runs, so the
  plugin follows vLLM's EVS pattern (``SupportsMultiModalPruning``): ``get_mrope_input_positions``
  gives the text its final positions (they do not depend on which blocks survive) and placeholders
  for the image tokens; the embeddings carry the survivors' positions in 4 extra columns, and
  ``recompute_mrope_positions`` (vLLM's, from ``vllm.multimodal.video_prune.evs``) writes them in.

Videos and image embeddings as inputs are not served with illava on (refused); Qwen2.5-VL (window
attention) is not served yet.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..merge import attention_with_received_scores
from ..plan import encoder as plan
from .config import resolve, spec_of
from .encoder import Stage
from .families import qwen2_vl as family
from .serving import check_serving


def stage_of(hf_config) -> Stage | None:
    config = resolve(spec_of(hf_config), family(hf_config))
    if config is None:
        return None
    return Stage(config, unit=hf_config.vision_config.spatial_merge_size**2)


def image_count(stage: Stage, t: int, h: int, w: int, merge: int) -> int:
    """LLM tokens of an image / video of ``t x h x w`` patches after the stages."""
    blocks = (h // merge, w // merge)
    per_frame = stage.units_after(blocks[0] * blocks[1], blocks)
    return stage.features_after(per_frame * t)


class IllavaQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    def get_supported_mm_limits(self):
        limits = dict(super().get_supported_mm_limits())
        if stage_of(self.get_hf_config()) is not None:
            limits["video"] = 0  # not served with illava on yet (docs/vllm.md)
        return limits

    def get_num_image_tokens(self, *, image_width, image_height, image_processor, mm_kwargs) -> int:
        stage = stage_of(self.get_hf_config())
        if stage is None:
            return super().get_num_image_tokens(
                image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
            )
        size, _ = self._get_vision_info(
            image_width=image_width,
            image_height=image_height,
            num_frames=1,
            image_processor=image_processor,
            mm_kwargs=mm_kwargs,
            modality="image",
        )
        vc = self.get_hf_config().vision_config
        return image_count(stage, 1, size.height // vc.patch_size, size.width // vc.patch_size, vc.spatial_merge_size)


class IllavaQwen2VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        stage = stage_of(self.info.get_hf_config())
        if stage is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def reduced(item_idx: int, stock):
            t, h, w = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return stock(item_idx)[: image_count(stage, t, h, w, merge)]

        return [
            PromptReplacement(u.modality, u.target, lambda i, stock=u.replacement: reduced(i, stock))
            if u.modality == "image"
            else u
            for u in updates
        ]


def _cu(frames: list[int], unit: int, device) -> torch.Tensor:
    counts = torch.tensor([0, *frames], dtype=torch.int64) * unit
    return counts.cumsum(0).to(device=device, dtype=torch.int32)


def _merge_block(blk, stage: Stage, layer: int, x, cos, sin, frames, grids, sizes):
    """A vision block with the encoder stage (``x`` ``(S, 1, D)``): attention frame by frame with
    the attention every token receives, whole 2x2 blocks removed per frame, the MLP on the
    survivors. Returns the survivors' hidden states and what later blocks need."""
    attn, unit = blk.attn, stage.unit
    hidden = blk.norm1(x)
    qkv, _ = attn.qkv(hidden)
    q, k, v = (t.transpose(0, 1) for t in attn.split_qkv(qkv))  # (1, S, H, hd)
    q, k = attn.apply_rotary_emb(torch.cat([q, k]), cos, sin).chunk(2)
    scale = attn.hidden_size_per_attention_head**-0.5
    starts = np.cumsum([0, *frames]) * unit
    outs, received = [], []
    for f, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        bias = None
        if stage.policy.proportional_attention and sizes is not None:  # ToMe: log(size) of every token
            bias = plan.size_bias(sizes[f][None], int(b - a), unit)
        out, score = attention_with_received_scores(*(t[:, a:b].transpose(1, 2) for t in (q, k, v)), scale, bias)
        outs.append(out[0])
        received.append(score[0])
    out, _ = attn.proj(torch.cat(outs).reshape(x.shape[0], 1, -1))
    hidden = x + out
    keys = k[0].mean(1)  # (S, hd), heads averaged
    tokens, kept_all, new_sizes, index = [], [], [], []
    for f, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        before = sizes[f][None] if sizes is not None else torch.ones(1, frames[f], device=x.device)
        step = plan.reduce_units(
            stage.config, stage.policy, layer, hidden[a:b, 0][None], received[f][None], unit, 0, keys[a:b][None],
            sizes=before, grid=grids[f] if grids is not None else None,
        )  # fmt: skip
        kept = step.result.kept[0]
        tokens.append(step.hidden[0])
        kept_all.append(kept)
        new_sizes.append(plan.merged_sizes(before, step.result, frames[f])[0])
        index.append(int(a) + (kept[:, None] * unit + torch.arange(unit, device=x.device)).flatten())
    hidden = torch.cat(tokens)[:, None]
    index = torch.cat(index)
    hidden = hidden + blk.mlp(blk.norm2(hidden))
    return hidden, cos[index], sin[index], [int(k.numel()) for k in kept_all], kept_all, new_sizes


def run_vision(visual, stage: Stage, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
    """vLLM's ``Qwen2VisionTransformer.forward`` with the encoder stage: the merger's output of the
    survivors and, per frame, the raster index of every surviving block."""
    x = visual.input_norm(pixel_values.to(device=visual.device), visual.dtype)
    x = visual.patch_embed(x)
    meta = visual.prepare_encoder_metadata(grid_thw)
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
    m, unit = visual.spatial_merge_size, stage.unit
    frames = [(h // m) * (w // m) for t, h, w in grid_thw for _ in range(t)]
    grids = [(h // m, w // m) for t, h, w in grid_thw for _ in range(t)]  # block grids while blocks are raster
    ids = [torch.arange(n, device=x.device) for n in frames]  # raster block of every current block, per frame
    sizes = None
    layers = set(stage.config.encoder_layers)
    x = x.unsqueeze(1)
    for i, blk in enumerate(visual.blocks):
        if i in layers:
            x, cos, sin, frames, kept, sizes = _merge_block(blk, stage, i, x, cos, sin, frames, grids, sizes)
            ids = [before[k] for before, k in zip(ids, kept)]
            grids = None
        else:
            cu = _cu(frames, unit, x.device)
            x = blk(
                x,
                cu_seqlens=cu,
                rotary_pos_emb_cos=cos,
                rotary_pos_emb_sin=sin,
                max_seqlen=visual.compute_attn_mask_seqlen(cu),
            )
    return visual.merger(x), ids


def survivor_positions(ids: list[torch.Tensor], t: int, h: int, w: int) -> torch.Tensor:
    """``(kept, 4)`` M-RoPE columns of an item's survivors as vLLM's EVS carries them: (t, h, w) of
    each surviving block (the item placed at position 0) and, in the 4th column, the offset of the
    text after the item: ``max(t - 1, h - 1, w - 1) + 1`` (the stock next position)."""
    rows = []
    for frame, blocks in enumerate(ids):
        rows.append(torch.stack([torch.full_like(blocks, frame), blocks // w, blocks % w], 1))
    out = torch.cat(rows)
    extent = torch.full_like(out[:, :1], max(t, h, w))
    return torch.cat([out, extent], 1)


@MULTIMODAL_REGISTRY.register_processor(
    IllavaQwen2VLMultiModalProcessor, info=IllavaQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class IllavaQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with iLLaVA's encoder stage when the served model is configured for it
    (``illava.vllm.config``); without a configuration, stock."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.illava = stage_of(self.config)
        if self.illava is None:
            return
        check_serving(vllm_config, "Qwen2-VL")
        if self.use_data_parallel:
            raise ValueError("illava.vllm: Qwen2-VL with illava does not run with --mm-encoder-tp-mode data")
        # vLLM's EVS path: the runner hands the embeddings' position columns to recompute_mrope_positions
        self.supports_multimodal_pruning = True
        mm_config = vllm_config.model_config.multimodal_config
        object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)

    def _process_image_input(self, image_input):
        if self.illava is None:
            return super()._process_image_input(image_input)
        if image_input["type"] == "image_embeds":
            raise ValueError("illava.vllm: image embeddings as inputs are not served with illava on; send images")
        grid_thw = image_input["image_grid_thw"].tolist()
        merged, ids = run_vision(self.visual, self.illava, image_input["pixel_values"], grid_thw)
        m = self.visual.spatial_merge_size
        out, start, frame = [], 0, 0
        for t, h, w in grid_thw:
            item_ids = ids[frame : frame + t]
            rows = sum(int(i.numel()) for i in item_ids)
            emb, pos = merged[start : start + rows], survivor_positions(item_ids, t, h // m, w // m)
            start, frame = start + rows, frame + t
            if self.illava.config.features_active:
                keep = self.illava.select(emb)
                emb, pos = emb[keep], pos[keep]
            expected = image_count(self.illava, t, h, w, m)
            if emb.shape[0] != expected:  # never hand vLLM a count its prompt does not hold
                raise RuntimeError(
                    f"illava.vllm: an image produced {emb.shape[0]} tokens; the processor reserved {expected}"
                )
            out.append(torch.cat([emb, pos.to(device=emb.device, dtype=emb.dtype)], 1))
        return tuple(out)

    def _process_video_input(self, video_input):
        if self.illava is not None:
            raise ValueError("illava.vllm: videos are not served with illava on yet (Qwen2-VL)")
        return super()._process_video_input(video_input)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions before the encoder runs: the text's final ones (the stock positions after every
        image: they do not depend on which blocks survive), the grid's first positions as
        placeholders for the reduced image tokens (``recompute_mrope_positions`` writes the
        survivors' own once the encoder has run)."""
        if self.illava is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        m = self.config.vision_config.spatial_merge_size
        parts, st, next_position = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError("illava.vllm: videos are not served with illava on yet (Qwen2-VL)")
            offset, length = feature.mm_position.offset, feature.mm_position.length
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            text = offset - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            grid = np.indices((t, h // m, w // m)).reshape(3, -1) + text + next_position
            parts.append(grid[:, :length])
            next_position, st = int(grid.max()) + 1, offset + length
        if st < len(input_tokens):
            text = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """vLLM's EVS recomputation (as Qwen2.5-VL's): the 4 position columns off the embeddings,
        the survivors' positions into the sequence's."""
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions(
            self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
        )
