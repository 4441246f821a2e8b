"""iLLaVA for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

The vision transformer packs every image and frame into one sequence (``cu_seqlens`` per frame),
and its patch merger folds every 2x2 block of neighbouring patches (4 consecutive tokens) into one
LLM token. So:
- scoring is per frame: the attention a token receives from the tokens of its own frame;
- removal is by whole 2x2 blocks (score of a block = mean score of its 4 tokens; recycling works
  on blocks, i.e. on the 4 tokens position by position), so the merger still folds real 2x2 blocks;
- after each merge the packed-sequence metadata the later blocks need (``cu_seqlens``, rotary
  embeddings, Qwen2.5-VL's windows) is gathered for the survivors and handed to them by pre-hooks;
- the merger output is scattered back to the stock number of LLM tokens with a mask of the
  survivors, so stock code splits it per image and computes M-RoPE positions as usual; the
  decoder-input hook then removes the slots of removed blocks and *gathers* the survivors' true
  (t, h, w) positions (no renumbering), so stock ``rope_deltas`` keep decoding positions right.

Qwen2.5-VL: most vision blocks attend within windows of 4x4 merged tokens (reordered so that each
window is contiguous); blocks ``fullatt_block_indexes`` (7, 15, 23, 31) attend over the whole frame.
Merges are allowed only at full-attention blocks: only there is the received attention a score over
the whole frame (in a window block it only ranks tokens against their window). Removing blocks
keeps windows valid: each window keeps its surviving blocks, contiguous, and empty windows vanish.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from ..config import removal_count
from ..merge import attention_with_received_scores, compose_assign, merge
from ..placeholders import PlaceholderMixin
from ..state import VisualItem
from . import Adapter, swap_class


def rope_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the Qwen-VL vision blocks: ``x`` ``(N, H, hd)``, cos/sin ``(N, hd)``, in float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


class VisionRun:
    """Packed-sequence metadata of one vision-encoder call, kept in step with the merges."""

    def __init__(self, model, grid_thw: torch.Tensor):
        visual = model.model.visual
        unit = visual.spatial_merge_size**2
        self.unit = unit
        self.grid_thw = grid_thw
        frame_tokens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        self.frame_blocks = (frame_tokens // unit).tolist()  # current blocks per frame
        blocks = int(frame_tokens.sum()) // unit
        self.block_ids = torch.arange(blocks)  # original (window-order) block of every current block
        self.assign = torch.arange(blocks)  # current block representing every original block, -1: dropped
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # illava.viz: (layer, owner, scores)
        self.window_index = None  # window order -> raster block index (Qwen2.5-VL)
        self.window_of_block = None
        if hasattr(visual, "fullatt_block_indexes"):
            self.window_index, cu_windows = get_vision_window_index(
                grid_thw.cpu(), visual.spatial_merge_size, visual.window_size, visual.patch_size
            )
            window_blocks = (cu_windows[1:] - cu_windows[:-1]) // unit
            self.window_of_block = torch.repeat_interleave(torch.arange(len(window_blocks)), window_blocks)
        self.position_embeddings = None
        self.reduced = False
        self.layers: list[tuple[int, int, int]] = []

    def cu_seqlens(self, full_attention: bool, device) -> torch.Tensor:
        if full_attention or self.window_of_block is None:
            counts = torch.tensor(self.frame_blocks)
        else:
            counts = torch.unique_consecutive(self.window_of_block, return_counts=True)[1]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), (counts * self.unit).cumsum(0)])
        return cu.to(device=device, dtype=torch.int32)


class IllavaQwenVisionBlock:
    """Qwen2-VL / Qwen2.5-VL vision block with the encoder stage.

    Modifications: attention runs per frame with explicit softmax to obtain the attention every
    token receives; after the attention residual and before the MLP, whole 2x2 blocks are removed
    per frame and recycled. Disabled: stock forward.
    """

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        state = self._illava
        if not state.config.encoder_active:
            return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        attn, run = self.attn, state.vision
        n = hidden_states.shape[0]
        hidden = self.norm1(hidden_states)
        q, k, v = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rope_vision(q, cos, sin), rope_vision(k, cos, sin)
        bounds = cu_seqlens.tolist()
        outputs, received = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            out, score = attention_with_received_scores(
                *(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), attn.scaling
            )
            outputs.append(out[0])
            received.append(score[0])
        hidden = hidden_states + attn.proj(torch.cat(outputs).reshape(n, -1))
        run.position_embeddings = position_embeddings
        hidden = _merge_blocks(state, run, self._illava_layer, hidden, torch.cat(received))
        return hidden + self.mlp(self.norm2(hidden))


def _merge_blocks(state, run: VisionRun, layer: int, hidden: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """Remove and recycle whole 2x2 blocks, frame by frame (frames of equal size in one batch)."""
    cfg, unit, device = state.config, run.unit, hidden.device
    dim = hidden.shape[-1]
    blocks = hidden.view(-1, unit * dim)
    block_scores = received.view(-1, unit).mean(-1)
    starts = torch.tensor([0, *run.frame_blocks]).cumsum(0)[:-1].tolist()
    removal = cfg.removal_at(layer)
    if isinstance(removal, int):
        removal = removal // unit  # counts are given in patch tokens; whole blocks are removed
    kept_blocks, new_values, new_counts = [], {}, []
    by_size: dict[int, list[int]] = {}
    for f, size in enumerate(run.frame_blocks):
        by_size.setdefault(size, []).append(f)
    new_frame_blocks = list(run.frame_blocks)
    local_assign = {}
    for size, frames in by_size.items():
        r = min(removal_count(size, removal), size - 1)
        index = torch.tensor([starts[f] for f in frames], device=device)[:, None] + torch.arange(size, device=device)
        res = merge(
            blocks[index],
            block_scores[index],
            r,
            cfg.recycle,
            neighbours=cfg.cluster_neighbours,
            recycle_fraction=cfg.cluster_fraction,
        )
        kept = index.gather(1, res.kept)
        for i, f in enumerate(frames):
            new_values[f] = (kept[i], res.tokens[i])
            new_frame_blocks[f] = size - r
            local_assign[f] = res.assign[i]
    for f in range(len(run.frame_blocks)):
        kept_blocks.append(new_values[f][0])
        new_counts.append(new_values[f][1])
    kept_blocks = torch.cat(kept_blocks)
    tokens = torch.cat(new_counts).reshape(-1, dim)
    layer_in, layer_out = sum(run.frame_blocks) * unit, tokens.shape[0]
    token_index = (kept_blocks[:, None] * unit + torch.arange(unit, device=device)).flatten()
    cos, sin = run.position_embeddings
    run.position_embeddings = (cos[token_index], sin[token_index])
    kept_cpu = kept_blocks.cpu()
    if state.record:
        _record_blocks(run, layer, new_frame_blocks, local_assign, block_scores, run.block_ids[kept_cpu])
    run.block_ids = run.block_ids[kept_cpu]
    if run.window_of_block is not None:
        run.window_of_block = run.window_of_block[kept_cpu]
    run.frame_blocks = new_frame_blocks
    run.reduced = True
    run.layers.append((layer, layer_in, layer_out))
    return tokens


def _record_blocks(run: VisionRun, layer, new_frame_blocks, local_assign, block_scores, new_ids) -> None:
    """Source tracking for ``illava.viz``: compose the merge into ``run.assign`` and record, per
    original block, its score before the merge and the original block now representing it."""
    new_starts = torch.tensor([0, *new_frame_blocks]).cumsum(0)[:-1].tolist()
    step = torch.cat([torch.where(a.cpu() >= 0, a.cpu() + new_starts[f], -1) for f, a in sorted(local_assign.items())])
    scores = torch.full((run.assign.shape[0],), float("nan"))
    scores[run.block_ids] = block_scores.float().cpu()
    run.assign = compose_assign(run.assign[None], step[None])[0]
    owner = torch.where(run.assign >= 0, new_ids[run.assign.clamp(min=0)], -1)
    run.records.append((layer, owner, scores))


class IllavaQwenVLModel(PlaceholderMixin):
    """Qwen2-VL / Qwen2.5-VL model: records whether the vision encoder runs for images or videos.

    Modifications: ``get_image_features`` / ``get_video_features`` tag the encoder call with its
    modality; ``get_placeholder_mask`` comes from ``PlaceholderMixin``.
    """

    # generate() picks the arguments of these from their signatures: keep the stock ones
    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        self._illava.vision_kind = "image"
        return super().get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        self._illava.vision_kind = "video"
        return super().get_video_features(pixel_values_videos, video_grid_thw, **kwargs)


class QwenVLAdapter(Adapter):
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    renumber_positions = False

    def parts(self, model):
        inner = model.model
        return inner, inner.visual, inner.language_model

    def family(self, model) -> str:
        return "qwen2_5_vl" if hasattr(model.model.visual, "fullatt_block_indexes") else "qwen2_vl"

    def dimensions(self, model) -> dict:
        vc, tc = model.config.vision_config, model.config.text_config
        return {
            "encoder_depth": vc.depth,
            "tokens_per_crop": 0,  # dynamic resolution: removals are fractions of the blocks present
            "llm_depth": tc.num_hidden_layers,
            "feature_layer": vc.depth - 1,
        }

    def llm_stage_in_presets(self, model) -> bool:
        # the authors turn the LLM stage off for Qwen2-VL-2B (text width 1536)
        return model.config.text_config.hidden_size >= 2048

    def adjust_preset(self, model, config):
        full = getattr(model.model.visual, "fullatt_block_indexes", None)
        if full is None or not config.encoder_layers:
            return config
        # scaled preset layers snap to the nearest full-attention blocks
        snapped = []
        for layer in config.encoder_layers:
            options = [b for b in full if b not in snapped] or list(full)
            snapped.append(min(options, key=lambda b: abs(b - layer)))
        return config.replace(encoder_layers=tuple(dict.fromkeys(snapped)))

    def check(self, model, config) -> None:
        full = getattr(model.model.visual, "fullatt_block_indexes", None)
        if full is not None:
            bad = [layer for layer in config.encoder_layers if layer not in full]
            if bad:
                raise ValueError(
                    f"IllavaConfig.encoder_layers: Qwen2.5-VL merges only at its full-attention blocks {list(full)} "
                    f"(window blocks score tokens only within their window); got {bad}"
                )

    def patch(self, model, state) -> None:
        inner, visual, _ = self.parts(model)
        swap_class(inner, IllavaQwenVLModel, state)
        state.vision_kind = "image"
        for i in state.config.encoder_layers:
            swap_class(visual.blocks[i], IllavaQwenVisionBlock, state)
            visual.blocks[i]._illava_layer = i

    def hooks(self, model, state) -> list:
        visual = model.model.visual
        full = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
        handles = [
            visual.register_forward_pre_hook(_start_run(model, state), with_kwargs=True),
            visual.merger.register_forward_hook(_scatter_merged(state)),
        ]
        if state.config.encoder_layers:
            first = min(state.config.encoder_layers)
            for i, block in enumerate(visual.blocks):
                if i > first:
                    handles.append(block.register_forward_pre_hook(_substitute(state, i in full), with_kwargs=True))
        return handles


def _record_items(run: VisionRun, items, raster_valid: torch.Tensor, merge_size: int) -> None:
    """Per-item ``illava.viz`` source tracking in raster block order (units: 2x2 blocks)."""
    total = raster_valid.shape[0]
    to_raster = run.window_index if run.window_index is not None else torch.arange(total)  # window pos -> raster
    from_raster = torch.argsort(to_raster)

    def raster(owner_window: torch.Tensor) -> torch.Tensor:
        """Per raster block: raster id of its representative (window-order arrays in)."""
        owner = owner_window[from_raster]
        return torch.where(owner >= 0, to_raster[owner.clamp(min=0)], -1)

    final = raster(torch.where(run.assign >= 0, run.block_ids[run.assign.clamp(min=0)], -1))
    start = 0
    for item, (t, h, w) in zip(items, run.grid_thw.tolist()):
        n = item.feature_tokens
        sl = slice(start, start + n)
        rank = torch.cumsum(raster_valid[sl].long(), 0) - 1
        local = final[sl] - start
        token0 = torch.where(local >= 0, rank[local.clamp(min=0)], -1)
        layers = []
        for layer, owner, scores in run.records:
            o = raster(owner)[sl] - start
            layers.append((layer, torch.where(o >= 0, o, -1), scores[from_raster][sl]))
        item.trace = {
            "family": "qwen_vl",
            "kind": item.kind,
            "grid_thw": (int(t), int(h), int(w)),
            "merge_size": merge_size,
            "encoder": layers,
            "token0": token0,
            "tokens": item.tokens,
        }
        start += n


def _start_run(model, state):
    def hook(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        state.vision = VisionRun(model, grid.cpu())

    return hook


def _substitute(state, full_attention: bool):
    def hook(module, args, kwargs):
        run = state.vision
        if run is None or not run.reduced:
            return None
        device = args[0].device if args else kwargs["hidden_states"].device
        cu = run.cu_seqlens(full_attention, device)
        kwargs["cu_seqlens"] = cu
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        kwargs["position_embeddings"] = tuple(t.to(device) for t in run.position_embeddings)
        return args, kwargs

    return hook


def _scatter_merged(state):
    """Merger output back to the stock number of LLM tokens (window order), plus survivor masks."""

    def hook(module, args, output):
        run = state.vision
        total = sum(int(t * h * w) for t, h, w in run.grid_thw.tolist()) // run.unit
        valid = torch.zeros(total, dtype=torch.bool)
        valid[run.block_ids] = True
        if run.reduced:
            full = output.new_zeros(total, output.shape[-1])
            full[run.block_ids.to(output.device)] = output
            output = full
        raster_valid = valid if run.window_index is None else valid[torch.argsort(run.window_index)]
        sizes = (run.grid_thw.prod(-1) // run.unit).tolist()
        items = [
            VisualItem(state.vision_kind, n, n, v if run.reduced else None, crops=int(t))
            for n, v, t in zip(sizes, torch.split(raster_valid, sizes), run.grid_thw[:, 0].tolist())
        ]
        if state.record:
            _record_items(run, items, raster_valid, round(run.unit**0.5))
        stats = {
            "kind": state.vision_kind,
            "crops": len(run.frame_blocks),
            "tokens": total * run.unit,
            "layers": run.layers,
        }
        state.add_pending(state.vision_kind, items, stats)
        return output

    return hook
