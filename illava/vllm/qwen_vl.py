"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``)
in vLLM with the encoder stage.

- Unit of removal: a 2x2 block of patches (the patch merger folds it into one LLM token), scored and
  removed per frame, as the transformers backend does (``illava.adapters.qwen_vl``): an image of
  ``h x w`` blocks keeps ``units_after(h * w)`` of them, which the processor reserves.
- The vision tower runs stock blocks on the packed sequence; a merge block attends frame by frame
  with explicit softmax (the attention every token receives), reduces its blocks with
  ``illava.plan.encoder.reduce_units``, and hands later blocks the survivors' sequences and rotary
  embeddings. Qwen2.5-VL holds blocks in window order and merges only at its full-attention blocks;
  a window keeps its surviving blocks, contiguous, and empty windows vanish (as in the backend). The
  merger's output is put back in raster order, as stock orders it.
- M-RoPE: survivors keep their own (t, h, w) positions and the text after an image keeps its stock
  positions, as in the transformers backend. vLLM assigns positions before the model runs, so the
  plugin follows vLLM's EVS pattern (``SupportsMultiModalPruning``): ``get_mrope_input_positions``
  gives the text its final positions (they do not depend on which blocks survive) and placeholders
  for the image tokens; the embeddings carry the survivors' positions in 6 extra columns
  (``encode_positions``: base 256, exact in bfloat16), and
  ``recompute_mrope_positions`` (vLLM's, from ``vllm.multimodal.video_prune.evs``) writes them in.

Videos: every temporal patch of 2 frames is a frame of the tower's packed sequence, scored and
reduced on its own as an image is (the transformers backend's rule), so a video of ``t x h x w``
patches keeps ``t`` times an image's count; survivors keep their (t, h, w) positions with vLLM's
temporal factor (Qwen2.5-VL: ``second_per_grid_ts * tokens_per_second``). vLLM's own video pruning
(EVS, ``--video-pruning-rate``) and illava are one or the other (refused together). Image and video
embeddings as inputs are not served with illava on (refused).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..plan import encoder as plan
from .config import once_per_model, resolve, spec_of
from .encoder import Stage, across_heads
from .families import qwen_vl as family
from .serving import check_serving, evs_refused


def _build_stage(hf_config) -> Stage | None:
    config = resolve(spec_of(hf_config), family(hf_config))
    if config is None:
        return None
    stage = Stage(config, unit=hf_config.vision_config.spatial_merge_size**2)
    stage.raster = hf_config.model_type == "qwen2_vl"  # Qwen2.5-VL's tower holds blocks in window order
    return stage


def stage_of(hf_config) -> Stage | None:
    """The stage of a served Qwen-VL model (``None``: illava is off), resolved once per model
    (``illava.vllm.config.once_per_model``); ``ValueError`` for what cannot run."""
    return once_per_model(hf_config, _build_stage)


def image_count(stage: Stage, t: int, h: int, w: int, merge: int) -> int:
    """LLM tokens of an image / video of ``t x h x w`` patches after the stages (the first merge
    sees the block grid while the tower holds blocks in raster order: Qwen2-VL)."""
    blocks = (h // merge, w // merge)
    per_frame = stage.units_after(blocks[0] * blocks[1], blocks if stage.raster else None)
    return stage.features_after(per_frame * t)


class _ProcessingInfo:
    def get_supported_mm_limits(self):
        if stage_of(self.get_hf_config()) is not None:  # read where vLLM starts: the error reaches the caller
            evs_refused(self.ctx.get_mm_config())
        return super().get_supported_mm_limits()

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


class _Processor:
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        stage = stage_of(self.info.get_hf_config())
        if stage is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def reduced(item_idx: int, stock, modality: str):
            t, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            return stock(item_idx)[: image_count(stage, t, h, w, merge)]

        return [
            PromptReplacement(u.modality, u.target, lambda i, stock=u.replacement, m=u.modality: reduced(i, stock, m))
            if u.modality in ("image", "video")
            else u
            for u in updates
        ]


def _qkv(attn, hidden, cos, sin):
    """The rotated queries and keys and the values of a Qwen2-VL / Qwen2.5-VL vision attention:
    ``(1, S, heads, head_dim)`` each, as the stock module computes them."""
    if hasattr(attn, "split_qkv"):  # Qwen2-VL
        qkv, _ = attn.qkv(hidden)
        q, k, v = (t.transpose(0, 1) for t in attn.split_qkv(qkv))
        q, k = attn.apply_rotary_emb(torch.cat([q, k]), cos, sin).chunk(2)
        return q, k, v
    qkv, _ = attn.qkv(hidden)  # Qwen2.5-VL: (S, 1, 3 * heads * head_dim)
    heads, dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    qkv = qkv.reshape(hidden.shape[0], 1, 3, heads, dim).permute(2, 1, 0, 3, 4)  # (3, 1, S, heads, dim)
    q, k = attn.apply_rotary_emb(qkv[:2].reshape(2, hidden.shape[0], heads, dim).contiguous(), cos, sin).chunk(2)
    return q, k, qkv[2]


def _merge_block(blk, stage: Stage, layer: int, x, cos, sin, frames: list[int], grids, sizes):
    """A vision block with the encoder stage (``x`` ``(S, 1, D)``, frames contiguous): attention
    frame by frame with the attention every token receives, whole 2x2 blocks removed per frame, the
    MLP on the survivors: the kernels of ``illava.plan.encoder`` (``frames_attention``,
    ``merge_frames``) that the transformers backend runs. Returns the survivors' hidden states, their
    rotary embeddings, the surviving blocks (indices into the blocks before) and their sizes."""
    attn, unit = blk.attn, stage.unit
    q, k, v = _qkv(attn, blk.norm1(x), cos, sin)
    scale = attn.hidden_size_per_attention_head**-0.5
    bounds = (np.cumsum([0, *frames]) * unit).tolist()
    proportional = stage.policy.proportional_attention and sizes is not None  # ToMe: log(size) of every token
    out, received = plan.frames_attention(q[0], k[0], v[0], bounds, scale, sizes if proportional else None, unit)
    out, _ = attn.proj(out.reshape(x.shape[0], 1, -1))  # row-parallel: the heads' outputs summed over ranks
    hidden = x + out
    tp = getattr(attn, "tp_size", 1)  # tensor parallelism: every rank holds some heads; decide on all of them
    received, keys = across_heads(received, tp), across_heads(k[0].mean(1), tp)
    config, policy = stage.config, stage.policy
    step = plan.merge_frames(config, policy, layer, hidden[:, 0], received, keys, frames, unit, sizes, grids)
    kept = step.kept
    index = (kept[:, None] * unit + torch.arange(unit, device=x.device)).flatten()
    hidden = step.tokens[:, None]
    hidden = hidden + blk.mlp(blk.norm2(hidden))
    return hidden, cos[index], sin[index], kept, step.sizes


class _Blocks:
    """The current 2x2 blocks of a vision call, in the tower's order (raster for Qwen2-VL; window
    order for Qwen2.5-VL, frames contiguous either way): their global raster index, frame and window."""

    def __init__(self, visual, grid_thw: list[list[int]], device):
        m = visual.spatial_merge_size
        self.unit = m * m
        self.frame_sizes = [(h // m) * (w // m) for t, h, w in grid_thw for _ in range(t)]
        self.frame = torch.repeat_interleave(torch.arange(len(self.frame_sizes)), torch.tensor(self.frame_sizes))
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        if self.windowed:  # Qwen2.5-VL: vLLM's window order and windows
            order, windows, offset = [], [], 0
            for t, h, w in grid_thw:
                index, cu = visual.get_window_index_thw(t, h, w)
                order.append(index + offset)
                offset += t * (h // m) * (w // m)
                counts = torch.diff(torch.cat([torch.zeros(1, dtype=cu.dtype), cu])) // (m * m)
                windows.append(counts)
            self.raster = torch.cat(order)
            counts = torch.cat(windows)
            self.window = torch.repeat_interleave(torch.arange(len(counts)), counts)
        else:
            self.raster = torch.arange(sum(self.frame_sizes))
            self.window = None

    def keep(self, kept: torch.Tensor) -> None:
        kept = kept.cpu()
        self.raster, self.frame = self.raster[kept], self.frame[kept]
        self.window = self.window[kept] if self.window is not None else None

    def frames(self) -> list[int]:
        return torch.bincount(self.frame, minlength=len(self.frame_sizes)).tolist()

    def cu(self, full: bool) -> np.ndarray:
        groups = self.frame if full or self.window is None else self.window
        counts = torch.unique_consecutive(groups, return_counts=True)[1]
        return np.concatenate([[0], np.cumsum(counts.numpy()) * self.unit]).astype(np.int32)


def _run_block(visual, blk, x, cos, sin, cu: np.ndarray):
    """A stock vision block over the current tokens (``cu``: their sequences, as vLLM's metadata)."""
    if not hasattr(visual, "fullatt_block_indexes"):  # Qwen2-VL
        cu_t = torch.from_numpy(cu).to(x.device)
        return blk(x, cu_seqlens=cu_t, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin,
                   max_seqlen=visual.compute_attn_mask_seqlen(cu_t))  # fmt: skip
    from vllm.model_executor.layers.attention import MMEncoderAttention

    backend = visual.attn_backend
    return blk(
        x,
        cu_seqlens=MMEncoderAttention.maybe_recompute_cu_seqlens(
            backend,
            cu,
            visual.hidden_size,
            visual.tp_size,
            x.device,
            fp8_padded_hidden_size=visual.fp8_padded_hidden_size,
        ),  # fmt: skip
        rotary_pos_emb_cos=cos,
        rotary_pos_emb_sin=sin,
        max_seqlen=torch.tensor(MMEncoderAttention.compute_max_seqlen(backend, cu), dtype=torch.int32),
        sequence_lengths=MMEncoderAttention.maybe_compute_seq_lens(backend, cu, x.device),
    )


def run_vision(visual, stage: Stage, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
    """vLLM's ``Qwen2VisionTransformer`` / ``Qwen2_5_VisionTransformer`` forward with the encoder
    stage: the merger's output of the survivors in raster order of every frame (as stock orders its
    output) and the global raster index of every survivor."""
    x = visual.input_norm(pixel_values.to(device=visual.device), visual.dtype)
    x = visual.patch_embed(x)
    meta = visual.prepare_encoder_metadata(grid_thw)
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]  # in the tower's order
    blocks = _Blocks(visual, grid_thw, x.device)
    unit = stage.unit
    if blocks.windowed:
        x = x.reshape(-1, unit, x.shape[-1])[meta["window_index"]].reshape(-1, x.shape[-1])
        full = set(visual.fullatt_block_indexes)
        grids = None  # blocks in window order: no raster grid
    else:
        full = set(range(len(visual.blocks)))
        m = visual.spatial_merge_size
        grids = [(h // m, w // m) for t, h, w in grid_thw for _ in range(t)]  # raster until the first merge
    sizes = None
    layers = set(stage.config.encoder_layers)
    x = x.unsqueeze(1)
    for i, blk in enumerate(visual.blocks):
        if i in layers:
            x, cos, sin, kept, sizes = _merge_block(blk, stage, i, x, cos, sin, blocks.frames(), grids, sizes)
            blocks.keep(kept)
            grids = None
        else:
            x = _run_block(visual, blk, x, cos, sin, blocks.cu(i in full))
    out = visual.merger(x)
    order = torch.argsort(blocks.raster)  # raster order of every frame, frames in order
    return out[order.to(out.device)], blocks.raster[order]


def survivor_positions(raster: torch.Tensor, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """``(kept, 3)`` M-RoPE (t, h, w) of an item's surviving blocks (``raster``: their indices over the
    item's ``t x h x w`` blocks; the item placed at position 0; the temporal index times ``t_factor``,
    truncated, as vLLM's stock positions)."""
    frame = raster // (h * w)
    if t_factor != 1.0:
        frame = (frame.double() * t_factor).long()
    return torch.stack([frame, raster % (h * w) // w, raster % w], 1)


POSITION_COLUMNS = 6  # the columns the survivors' positions add to an item's embeddings


def encode_positions(positions: torch.Tensor, dtype) -> torch.Tensor:
    """``(rows, 3)`` positions as ``(rows, 6)`` columns of ``dtype``, each position in two base-256
    digits: exact in bfloat16 (whose integers are exact only up to 256: a video's temporal position
    of 257 would come back as 256) up to 65,535. ``decode_positions`` reads them back."""
    if positions.numel() and (int(positions.max()) >= 256 * 256 or int(positions.min()) < 0):
        raise RuntimeError("illava.vllm: an M-RoPE position beyond what the embeddings carry (0-65535)")
    return torch.stack([positions // 256, positions % 256], -1).reshape(positions.shape[0], -1).to(dtype)


def decode_positions(columns: torch.Tensor) -> torch.Tensor:
    """``(rows, 3)`` long positions from the ``(rows, 6)`` columns of ``encode_positions``."""
    digits = columns.float().round().long().reshape(columns.shape[0], 3, 2)
    return digits[..., 0] * 256 + digits[..., 1]


class _Model:
    """vLLM's Qwen2-VL / Qwen2.5-VL with iLLaVA's encoder stage when the served model is configured
    for it (``illava.vllm.config``); without a configuration, stock."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.illava = stage_of(self.config)
        if self.illava is None:
            return
        check_serving(vllm_config, "Qwen-VL")  # --mm-encoder-tp-mode data: every rank runs the whole tower
        evs_refused(vllm_config.model_config.multimodal_config)  # (the processor refuses it first)
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
        return self._embed("image", image_input["pixel_values"], grid_thw, [1.0] * len(grid_thw))

    def _process_video_input(self, video_input):
        if self.illava is None:
            return super()._process_video_input(video_input)
        if video_input["type"] == "video_embeds":
            raise ValueError("illava.vllm: video embeddings as inputs are not served with illava on; send videos")
        grid_thw = video_input["video_grid_thw"].tolist()
        # vLLM's temporal factor of every video (``iter_mm_grid_thw``): 1 for Qwen2-VL
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_input.get("second_per_grid_ts")
        seconds = seconds.tolist() if seconds is not None else [1.0] * len(grid_thw)
        factors = [float(s) * per_second for s in seconds]
        return self._embed("video", video_input["pixel_values_videos"], grid_thw, factors)

    def _embed(self, kind: str, pixel_values, grid_thw: list[list[int]], factors: list[float]):
        """The survivors of every item (image or video), each with its position columns
        (``survivor_positions``, ``encode_positions``), at the count its prompt reserved (``image_count``)."""
        merged, raster = run_vision(self.visual, self.illava, pixel_values, grid_thw)
        m = self.visual.spatial_merge_size
        out, start, first = [], 0, 0
        for (t, h, w), factor in zip(grid_thw, factors):
            blocks = t * (h // m) * (w // m)
            mine = (raster >= first) & (raster < first + blocks)
            rows = int(mine.sum())
            emb = merged[start : start + rows]
            pos = survivor_positions(raster[mine] - first, h // m, w // m, factor)
            start, first = start + rows, first + blocks
            if self.illava.config.features_active:
                keep = self.illava.select(emb)
                emb, pos = emb[keep], pos[keep]
            expected = image_count(self.illava, t, h, w, m)
            if emb.shape[0] != expected:  # never hand vLLM a count its prompt does not hold
                raise RuntimeError(
                    f"illava.vllm: a{'n image' if kind == 'image' else ' video'} produced {emb.shape[0]} tokens; "
                    f"the processor reserved {expected}"
                )
            out.append(torch.cat([emb, encode_positions(pos, emb.dtype).to(emb.device)], 1))
        return tuple(out)

    def get_encoder_cudagraph_config(self):
        """No encoder CUDA graphs with illava on: they replay the stock tower, not the stage."""
        config = super().get_encoder_cudagraph_config()
        return config if self.illava is None else dataclasses.replace(config, modalities=[])

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions before the encoder runs: the text's final ones (the stock positions after every
        image: they do not depend on which blocks survive), the grid's first positions as
        placeholders for the reduced image tokens (``recompute_mrope_positions`` writes the
        survivors' own once the encoder has run)."""
        if self.illava is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        parts, st, next_position = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):  # vLLM's grids and temporal factors
            length = lengths[offset]
            text = offset - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            grid = grid.reshape(3, -1) + text + next_position
            parts.append(grid[:, :length])
            next_position, st = int(grid.max()) + 1, offset + length
        if st < len(input_tokens):
            text = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """The survivors' own positions into the sequence's, after the encoder ran (vLLM's EVS hook).
        Not vLLM's ``evs.recompute_mrope_positions``: it finds the next item by counting media tokens
        only, so in a prompt whose first image keeps fewer tokens than the text before it, the second
        image's positions overwrote the first's. The text already has its final positions
        (``get_mrope_input_positions``); only the image slots of this chunk are written. Without
        illava (stock, Qwen2.5-VL with vLLM's EVS on): vLLM's own, as stock."""
        if self.illava is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )  # fmt: skip
        tokens = (self.config.image_token_id, self.config.video_token_id)
        return write_survivor_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens, tokens)


def write_survivor_positions(input_ids, embeddings, positions: torch.Tensor, computed: int, media_tokens):
    """``(embeddings without their position columns, positions, delta)``: every item of
    ``embeddings`` (the image and video runs of the prompt from ``computed`` on, in order; the first
    one may be the rest of an item a chunk boundary split) has its survivors' (t, h, w) written at
    its slots, offset by the position after the item's ``<|vision_start|>``. ``positions`` ``(3, N)``;
    ``media_tokens``: the placeholder ids (image, video; one id: images only)."""
    ids = torch.as_tensor(input_ids).flatten().cpu()
    media = torch.isin(ids, torch.tensor(media_tokens).flatten())
    is_image = torch.cat([torch.zeros(1, dtype=torch.int8), media.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    change = torch.diff(is_image)
    runs = [
        (s, e)
        for s, e in zip((change == 1).nonzero()[:, 0].tolist(), (change == -1).nonzero()[:, 0].tolist())
        if e > computed
    ]
    if len(runs) < len(embeddings):
        raise RuntimeError(f"illava.vllm: {len(embeddings)} media items for {len(runs)} media runs of the prompt")
    positions = positions.clone()
    out = []
    for (start, end), item in zip(runs, embeddings):
        rows = item.shape[0]
        first = start + max(computed - start, 0)
        if first + rows > end:
            raise RuntimeError(f"illava.vllm: an image item of {rows} rows does not fit its {end - start} slots")
        survivors = decode_positions(item[:, -POSITION_COLUMNS:]).T.to(positions.device)  # (3, rows): t, h, w
        positions[:, first : first + rows] = survivors + positions[0, start - 1] + 1
        out.append(item[:, :-POSITION_COLUMNS])
    return out, positions, int(positions.max() + 1 - ids.numel())


class IllavaQwen2VLProcessingInfo(_ProcessingInfo, Qwen2VLProcessingInfo):
    pass


class IllavaQwen2VLMultiModalProcessor(_Processor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    IllavaQwen2VLMultiModalProcessor, info=IllavaQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class IllavaQwen2VLForConditionalGeneration(_Model, Qwen2VLForConditionalGeneration):
    pass


class IllavaQwen2_5_VLProcessingInfo(_ProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class IllavaQwen2_5_VLMultiModalProcessor(_Processor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    IllavaQwen2_5_VLMultiModalProcessor,
    info=IllavaQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class IllavaQwen2_5_VLForConditionalGeneration(_Model, Qwen2_5_VLForConditionalGeneration):
    pass
