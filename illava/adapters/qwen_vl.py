"""iLLaVA for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

The vision transformer packs every image and frame into one sequence (``cu_seqlens`` per frame),
and its patch merger folds every 2x2 block of neighbouring patches (4 consecutive tokens) into one
LLM token. So:
- unit of removal: a 2x2 block; scoring is per frame (the attention a token receives from the
  tokens of its own frame; a block's score is the mean of its 4 tokens'), recycling works on
  blocks (their 4 tokens position by position), so the merger still folds real 2x2 blocks;
- after each merge the packed-sequence metadata later blocks need (``cu_seqlens``, rotary
  embeddings, Qwen2.5-VL's windows) is kept per merge layer and handed to them by pre-hooks;
- the merger output is written back at the stock number of LLM tokens (NaN rows for removed
  blocks), so stock code splits it per image and computes M-RoPE positions as usual; the decoder
  input drops the removed slots and *gathers* the survivors' true (t, h, w) positions (no
  renumbering), so stock ``rope_deltas`` keep decoding positions right.

Qwen2.5-VL: most vision blocks attend within windows of 4x4 merged tokens (reordered so that each
window is contiguous); blocks ``fullatt_block_indexes`` (7, 15, 23, 31) attend over the whole frame.
Merges are allowed only at full-attention blocks: only there is the received attention a score over
the whole frame. Removing blocks keeps windows valid: each window keeps its surviving blocks,
contiguous, and empty windows vanish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.vision_utils import get_vision_window_index

from .. import families
from ..hf.encoder import (
    FeatureCalls,
    collecting_attentions,
    current_call,
    stock_count_features,
)
from ..merge import compose_assign
from ..patch import Hook
from ..plan import encoder as plan
from ..state import UnitTrace
from .base import Adapter


def rope_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the Qwen-VL vision blocks: ``x`` ``(N, H, hd)``, cos/sin ``(N, hd)``, in float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


@dataclass
class Blocks:
    """The current blocks of one vision call, after some merge layer."""

    frame_blocks: list[int]  # blocks per frame
    block_ids: torch.Tensor  # original (window-order) block of every current block
    window_of_block: torch.Tensor | None  # Qwen2.5-VL: window of every current block
    position_embeddings: tuple | None  # rotary (cos, sin) of the current tokens
    sizes: torch.Tensor | None = None  # original blocks every current block stands for


class VisionRun:
    """Packed-sequence metadata of one vision call, after every merge layer (a merge layer run again
    by gradient checkpointing reuses the same decisions)."""

    def __init__(self, visual, grid_thw: torch.Tensor):
        self.unit = visual.spatial_merge_size**2
        self.grid_thw = grid_thw
        frame_tokens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        blocks = int(frame_tokens.sum()) // self.unit
        self.window_index = None  # window order -> raster block index (Qwen2.5-VL)
        window_of_block = None
        if hasattr(visual, "fullatt_block_indexes"):
            self.window_index, cu_windows = get_vision_window_index(
                grid_thw.cpu(), visual.spatial_merge_size, visual.window_size, visual.patch_size
            )
            window_blocks = (cu_windows[1:] - cu_windows[:-1]) // self.unit
            window_of_block = torch.repeat_interleave(torch.arange(len(window_blocks)), window_blocks)
        self.initial = Blocks((frame_tokens // self.unit).tolist(), torch.arange(blocks), window_of_block, None)
        side = visual.spatial_merge_size
        # the block grid of every frame, while blocks are in raster order (Qwen2-VL, before any merge)
        self.grids = [(int(h) // side, int(w) // side) for t, h, w in grid_thw.tolist() for _ in range(int(t))]
        self.after: dict[int, Blocks] = {}
        # every merge: (layer, blocks before, assign and scores of every frame), read by ``_unit_trace``
        self.merges: list[tuple[int, Blocks, list[torch.Tensor], list[torch.Tensor]]] = []
        # Qwen3-VL deepstack: hidden states taken at a vision block (and the merge steps done then),
        # which later merges reduce with the weights the policy used for the main tokens
        self.companions: dict[int, tuple[torch.Tensor, int]] = {}
        self.steps: list[tuple[int, list]] = []  # (blocks after, [(old rows, new rows, weights)] per group)
        self.probed: set[int] = set()  # merge layers whose weights were probed
        # merge layers whose attention ran as the stock module while transformers collected attention
        # maps (read again by the recomputation of gradient checkpointing, which collects nothing)
        self.collecting: dict[int, bool] = {}

    def before(self, layer: int) -> Blocks:
        done = [k for k in self.after if k < layer]
        return self.after[max(done)] if done else self.initial

    def last(self) -> Blocks:
        return self.before(10**9)

    def cu_seqlens(self, blocks: Blocks, full_attention: bool, device) -> torch.Tensor:
        if full_attention or blocks.window_of_block is None:
            counts = torch.tensor(blocks.frame_blocks)
        else:
            counts = torch.unique_consecutive(blocks.window_of_block, return_counts=True)[1]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), (counts * self.unit).cumsum(0)])
        return cu.to(device=device, dtype=torch.int32)


def _run_of(state, position_embeddings) -> VisionRun | None:
    """The run of a vision call, found from the call's own rotary tensor (also during backward)."""
    key = position_embeddings[0]
    run = state.keyed.get(key)
    if run is None:
        call = current_call(state)
        run = call.vision_run if call is not None else None
        if run is not None:
            state.keyed[key] = run
    return run


class IllavaQwenVisionBlock:
    """Qwen2-VL / Qwen2.5-VL vision block with the encoder stage.

    Modifications: attention runs per frame with explicit softmax to obtain the attention every
    token receives; after the attention residual and before the MLP, whole 2x2 blocks are removed
    per frame and recycled. Disabled: stock forward.
    """

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        state = self._illava.state
        run = _run_of(state, position_embeddings) if state.config.encoder_active else None
        if run is None:
            return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        layer = self._illava.layer
        blocks = run.before(layer)
        if blocks.position_embeddings is not None:
            position_embeddings = blocks.position_embeddings
        attn = self.attn
        n = hidden_states.shape[0]
        hidden = self.norm1(hidden_states)
        q, k, v = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rope_vision(q, cos, sin), rope_vision(k, cos, sin)
        cu = run.cu_seqlens(blocks, True, hidden.device)
        proportional = state.policy.proportional_attention and blocks.sizes is not None  # ToMe: log(size)
        out, received = plan.frames_attention(
            q, k, v, cu.tolist(), attn.scaling, blocks.sizes if proportional else None, run.unit
        )
        collecting = run.collecting.setdefault(layer, collecting_attentions())
        if collecting:  # transformers records what the stock attention module returns
            kwargs["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
            hidden = hidden_states + attn(hidden, cu_seqlens=cu, position_embeddings=position_embeddings, **kwargs)
        else:
            hidden = hidden_states + attn.proj(out)
        hidden = _merge_blocks(state, run, layer, blocks, hidden, received, position_embeddings, k.mean(1))
        return hidden + self.mlp(self.norm2(hidden))


def _merge_blocks(state, run: VisionRun, layer: int, blocks: Blocks, hidden, received, position_embeddings, keys):
    """Remove and recycle whole 2x2 blocks, frame by frame (``illava.plan.encoder.merge_frames``, as
    vLLM does); the packed-sequence metadata of the survivors is kept for the later blocks
    (``run.after``)."""
    unit, device = run.unit, hidden.device
    # companions (Qwen3-VL deepstack) follow this merge with the weights the policy combined blocks with
    probe = layer in run.probed or (layer not in run.after and bool(run.companions))
    raster = blocks is run.initial and run.window_index is None  # the block grids hold while in raster order
    step = plan.merge_frames(
        state.config, state.policy, layer, hidden, received, keys, blocks.frame_blocks, unit,
        blocks.sizes, run.grids if raster else None, with_weights=probe,
    )  # fmt: skip
    out = step.tokens
    if layer in run.after:  # run again (gradient checkpointing): same decisions, nothing to record
        return out
    kept_blocks = step.kept
    token_index = (kept_blocks[:, None] * unit + torch.arange(unit, device=device)).flatten()
    kept_cpu = kept_blocks.cpu()
    new_counts = step.counts
    run.after[layer] = Blocks(
        new_counts,
        blocks.block_ids[kept_cpu],
        blocks.window_of_block[kept_cpu] if blocks.window_of_block is not None else None,
        tuple(t[token_index] for t in position_embeddings),
        step.sizes.cpu(),
    )
    starts_new = torch.tensor([0, *new_counts]).cumsum(0)[:-1]
    if probe:
        run.probed.add(layer)
        steps = []
        for group, index, weights in step.groups:
            rows = starts_new[group].to(device)[:, None] + torch.arange(weights.shape[1], device=device)
            steps.append((index, rows, weights))
        run.steps.append((sum(new_counts), steps))
    call = current_call(state)
    if call is not None:
        call.layers.append((layer, sum(blocks.frame_blocks) * unit, out.shape[0]))
        seen: dict[int, int] = {}
        for size in blocks.frame_blocks:
            seen[size] = seen.get(size, 0) + 1
        for size, frames in seen.items():
            cap = plan.capped(state.config, state.policy, layer, size, unit)
            if cap is not None:
                call.capped.append((layer, frames, *cap))
        # what the source tracking needs (``_unit_trace``): small tensors, left on their device
        run.merges.append((layer, blocks, [f.assign for f in step.frames], [f.scores.detach() for f in step.frames]))
    return out


class Substitute(Hook):
    """Pre-hook on a vision block after a merge: the survivors' ``cu_seqlens`` (frames or windows),
    rotary embeddings and maximum length."""

    def __init__(self, state, layer: int, full_attention: bool):
        super().__init__(state)
        self.layer = layer
        self.full_attention = full_attention

    def __call__(self, module, args, kwargs):
        if not self.state.config.encoder_active:
            return None
        embeddings = kwargs.get("position_embeddings")
        run = _run_of(self.state, embeddings) if embeddings is not None else None
        if run is None:
            return None
        blocks = run.before(self.layer)
        if blocks.position_embeddings is None:
            return None
        device = args[0].device if args else kwargs["hidden_states"].device
        cu = run.cu_seqlens(blocks, self.full_attention, device)
        kwargs["cu_seqlens"] = cu
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        kwargs["position_embeddings"] = tuple(t.to(device) for t in blocks.position_embeddings)
        return args, kwargs


class StartRun(Hook):
    """Pre-hook on the vision transformer: the bookkeeping of this call."""

    def __call__(self, module, args, kwargs):
        call = current_call(self.state)
        if call is not None:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            call.vision_run = VisionRun(module, grid.cpu())
        return None


class ScatterMerged(Hook):
    """Forward hook on the patch merger: its output back at the stock number of LLM tokens (window
    order), NaN for removed blocks; and the call's statistics."""

    def __call__(self, module, args, kwargs, output):
        call = current_call(self.state)
        run = call.vision_run if call is not None else None
        if run is None:
            return None
        total = sum(int(t * h * w) for t, h, w in run.grid_thw.tolist()) // run.unit
        blocks = run.last()
        call.crops, call.tokens = len(run.initial.frame_blocks), total * run.unit
        call.item_crops = run.grid_thw[:, 0].tolist()
        if blocks is not run.initial:
            output = stock_count_features(output, blocks.block_ids.to(output.device), total)
        return output


def _unit_trace(run: VisionRun) -> UnitTrace:
    """``illava.tools.viz``: units are 2x2 blocks in raster order of every frame; the owner of every
    original block after each merge and the scores before it, composed from ``run.merges``."""
    total = run.initial.block_ids.shape[0]
    assign = torch.arange(total)  # current block representing every original block, -1: dropped
    records = []
    for layer, blocks, assigns, scores in run.merges:
        starts = torch.tensor([0, *run.after[layer].frame_blocks]).cumsum(0)[:-1].tolist()
        step = torch.cat([torch.where(a.cpu() >= 0, a.cpu() + start, -1) for a, start in zip(assigns, starts)])
        before = torch.full((total,), float("nan"))
        before[blocks.block_ids] = torch.cat(scores).float().cpu()  # as CropTrace.step
        assign = compose_assign(assign[None], step[None])[0]
        ids = run.after[layer].block_ids
        records.append((layer, torch.where(assign >= 0, ids[assign.clamp(min=0)], -1), before))
    to_raster = run.window_index if run.window_index is not None else torch.arange(total)  # window pos -> raster
    from_raster = torch.argsort(to_raster)

    def raster(owner_window: torch.Tensor) -> torch.Tensor:
        owner = owner_window[from_raster]
        return torch.where(owner >= 0, to_raster[owner.clamp(min=0)], -1)

    blocks = run.last()
    final = raster(torch.where(assign >= 0, blocks.block_ids[assign.clamp(min=0)], -1))
    side = round(run.unit**0.5)
    grids = [(int(h) // side, int(w) // side) for t, h, w in run.grid_thw.tolist() for _ in range(int(t))]
    layers = [(layer, raster(owner), scores[from_raster]) for layer, owner, scores in records]
    return UnitTrace(grids=grids, layers=layers, feature=final)


class IllavaQwenVLModel(FeatureCalls):
    """Qwen2-VL / Qwen2.5-VL model: the feature calls (``FeatureCalls``); the encoder stage itself
    lives in the vision blocks and the hooks on the vision transformer. Disabled: stock."""

    def _illava_units(self, call):
        return _unit_trace(call.vision_run)


class QwenVLAdapter(Adapter):
    record = families.QWEN_VL  # merges, snapped presets: Qwen2.5-VL's full-attention blocks only

    def parts(self, model):
        from .base import Parts

        inner = model.model
        return Parts(inner, inner.visual, inner.language_model)

    def check(self, model, config) -> None:
        full = getattr(model.model.visual, "fullatt_block_indexes", None)
        if full is not None:
            bad = [layer for layer in config.encoder_layers if layer not in full]
            if bad:
                raise ValueError(
                    f"IllavaConfig.encoder_layers: Qwen2.5-VL merges only at its full-attention blocks {list(full)} "
                    f"(window blocks score tokens only within their window); got {bad}"
                )

    model_mixin = IllavaQwenVLModel
    layer_mixin = IllavaQwenVisionBlock

    def encoder_layers(self, model):
        return model.model.visual.blocks

    def patch_more(self, model, record) -> None:
        visual, state = model.model.visual, record.state
        layers = state.config.encoder_layers
        record.hook(visual, StartRun(state), "pre")
        record.hook(visual.merger, ScatterMerged(state), "post")
        if layers:
            full = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
            for i, block in enumerate(visual.blocks):
                if i > min(layers) and i not in layers:
                    record.hook(block, Substitute(state, i, i in full), "pre")
