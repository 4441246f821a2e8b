"""The encoder stage's decision for one merge step over a batch of crops, as tensors in and out.

A *crop* is what one attention pass of the vision encoder sees (an image, a tile, a frame); a *unit*
is what the stage removes: ``unit`` consecutive tokens (1: a patch; 4: a 2x2 block a patch merger
or a pixel shuffle folds into one LLM token; 16: a 4x4 block a pooling folds), after ``keep_first``
tokens that are never removed (a CLS token). A backend measures the attention every token receives
and the layer's keys, asks ``merge_units`` (or ``reduce_units`` for its own bookkeeping), and runs
the rest of the layer on the survivors.

- ``reduce_units``: score the units (mean received attention of their tokens), remove and recycle
  the configured number with the policy; optionally the weights every output unit combines the
  input units with (``with_weights``: streams that must follow the merge, e.g. Qwen3-VL deepstack);
- ``merge_units``: ``reduce_units`` plus the ``CropTrace`` bookkeeping (trace in, trace out);
- ``CropTrace``: which original unit every current unit is, and how many each stands for;
- ``merged_sizes`` / ``size_bias``: token sizes after a merge, and ToMe's ``log(size)`` bias;
- ``removal_count``: the units one step removes from a crop, capped at what the policy can remove
  there (``Policy.max_removal``; an error only in strict mode); ``capped``: whether it caps;
- ``units_after``: the units of a crop left after every merge layer (what a serving engine reserves
  placeholders for before the model runs: ``illava.vllm``);
- ``block_order``: raster -> block order of the patches of a square crop (units of ``k x k``);
  ``to_block_order``: a merge layer's tokens put in it.

The kernels both engines run (each on its own modules, with no copy of the computation):

- ``attend_and_score``: a ViT merge layer's attention and the attention every token receives
  (all queries, the CLS token's, or none);
- ``frames_attention`` / ``merge_frames``: the attention and the merge step of the frames of a
  packed sequence (Qwen-VL's vision blocks), frames of one size merged together.

Nothing here imports transformers or the Hugging Face backend (``illava.state``, ``illava.patch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import removal_units
from ..merge import MergeResult, attention_with_received_scores, compose_assign
from ..policy import DEFAULT as _DEFAULT_POLICY


def removal_count(units: int, removal: int | float, unit: int, layer: int, policy=None, strict: bool = False) -> int:
    """Units removed from a crop of ``units`` units at ``layer``: a count is given in tokens, a
    fraction is of the units present. The one rule for a crop or frame that cannot give it: the
    result is capped at ``policy.max_removal(units)`` (all but one unit; ToMe: half), so a small
    image is reduced less, never refused. ``strict``: raise ``ValueError`` instead of capping."""
    asked = removal_units(units, removal, unit)
    cap = (policy or _DEFAULT_POLICY).max_removal(units)
    if asked > cap and strict:
        raise ValueError(
            f"illava: encoder layer {layer} would remove {asked} of the {units} units ({asked * unit} of the "
            f"{units * unit} tokens) of a crop or frame, more than the {cap} the "
            f"{(policy or _DEFAULT_POLICY).name} policy can remove there; lower encoder_removal (counts are per "
            "crop / frame), or leave IllavaConfig.strict off to cap it"
        )
    return min(asked, cap)


def cls_received(query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None = None):
    """The attention every token receives from the crop's first token (its CLS token), averaged over
    heads: ``(B, N)`` float32, from ``query`` / ``key`` ``(B, H, N, hd)`` and an additive ``bias``
    broadcastable to ``(B, H, 1, N)`` (ToMe's sizes). One query row: the scoring of policies whose
    ``encoder_query`` is ``"cls"`` (VisionZip)."""
    logits = torch.matmul(query[:, :, :1].float(), key.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


def capped(config, policy, layer: int, units: int, unit: int = 1) -> tuple[int, int] | None:
    """``(asked, removed)`` in tokens per crop when ``removal_count`` caps layer ``layer``'s removal
    on a crop of ``units`` units; ``None`` when the crop gives what is configured."""
    asked = removal_units(units, config.removal_at(layer), unit)
    removed = removal_count(units, config.removal_at(layer), unit, layer, policy)
    return (asked * unit, removed * unit) if removed < asked else None


def units_after(config, policy, units: int, unit: int = 1, grid: tuple[int, int] | None = None) -> int:
    """Units of a crop of ``units`` units left after every merge layer of ``config`` with
    ``policy`` (``policy.kept`` of every step); ``grid``: the unit grid while all units are there in
    raster order (the first step's; ``None``: none). The count ``reduce_units`` produces, known
    before the model runs."""
    if not config.encoder_active:
        return units
    for i, layer in enumerate(sorted(config.encoder_layers)):
        r = removal_count(units, config.removal_at(layer), unit, layer, policy, config.strict)
        units = policy.kept(units, r, grid if i == 0 else None)
    return units


def merged_sizes(sizes: torch.Tensor | None, res: MergeResult, n: int) -> torch.Tensor:
    """Original units every output unit stands for after a merge (``res.assign``); ``sizes``
    ``(B, n)`` before it (``None``: 1 each)."""
    b = res.assign.shape[0]
    sizes = torch.ones(b, n, device=res.assign.device) if sizes is None else sizes
    out = torch.zeros(b, res.kept.shape[1] + 1, device=sizes.device)
    slot = torch.where(res.assign >= 0, res.assign, res.kept.shape[1])
    return out.scatter_add_(1, slot, sizes.float())[:, :-1]


def size_bias(sizes: torch.Tensor | None, n: int, unit: int = 1, keep_first: int = 0) -> torch.Tensor | None:
    """``log(size)`` of every token as an additive attention bias ``(B, 1, 1, n)`` (ToMe's
    proportional attention): a unit's ``unit`` tokens share its size, ``keep_first`` tokens have
    size 1; ``None`` while every unit is an original one (``sizes`` ``None``)."""
    if sizes is None:
        return None
    sizes = sizes.repeat_interleave(unit, dim=1)
    sizes = torch.cat([sizes.new_ones(sizes.shape[0], keep_first), sizes], dim=1)
    return sizes.log()[:, None, None, :n]


def block_order(side: int, kernel: int, device=None) -> torch.Tensor:
    """Raster index of the patch at every position of the block order of a ``side x side`` crop:
    block after block (raster order of the block grid), each block's ``kernel x kernel`` patches in
    raster order. ``(side * side,)``."""
    blocks = side // kernel
    r = torch.arange(side, device=device)[:, None]
    c = torch.arange(side, device=device)[None]
    key = ((r // kernel) * blocks + c // kernel) * kernel * kernel + (r % kernel) * kernel + c % kernel
    return torch.argsort(key.flatten())


def square_grid(units: int) -> tuple[int, int] | None:
    """The unit grid of a square crop of ``units`` units (``None`` if ``units`` is no square)."""
    side = round(units**0.5)
    return (side, side) if side * side == units else None


@dataclass
class CropTrace:
    """Which original unit every current unit of a batch of crops is.

    ``positions`` ``(B, n)``: original unit of each current unit; ``assign`` ``(B, U)``: current
    unit representing each original unit (-1: dropped); ``sizes`` ``(B, n)``: original units each
    current unit stands for (``None`` before any merge); ``records``: per merge step while
    recording, ``(layer, owner (B, U), score of every original unit before the step (NaN: gone))``.
    """

    positions: torch.Tensor
    assign: torch.Tensor
    sizes: torch.Tensor | None = None
    records: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def start(cls, crops: int, units: int, device=None) -> CropTrace:
        index = torch.arange(units, device=device).expand(crops, units)
        return cls(index, index)

    def step(self, layer: int, res: MergeResult, scores: torch.Tensor, record: bool = False) -> CropTrace:
        """The trace after a merge ``res`` of the current units (``scores``: their scores before)."""
        before = self.positions
        positions = before.gather(1, res.kept)
        assign = compose_assign(self.assign, res.assign)
        records = list(self.records)
        if record:
            crops, units = assign.shape
            owner = torch.where(assign >= 0, positions.gather(1, assign.clamp(min=0)), -1)
            full = torch.full((crops, units), float("nan"), device=scores.device)
            # detached: a record is for pictures, and it saves nothing for backward (gradient
            # checkpointing's recomputation, which records nothing, must save what the forward saved)
            records.append((layer, owner.cpu(), full.scatter(1, before, scores.detach().float()).cpu()))
        return CropTrace(positions, assign, merged_sizes(self.sizes, res, before.shape[1]), records)

    def call_layers(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``records`` with units numbered over the whole batch (crop after crop): ``(layer, owner
        (B * U,), scores (B * U,))``."""
        units = self.assign.shape[1]
        offset = (torch.arange(self.assign.shape[0]) * units)[:, None]
        return [
            (layer, torch.where(owner >= 0, owner + offset, -1).flatten(), scores.flatten())
            for layer, owner, scores in self.records
        ]


@dataclass
class UnitStep:
    """One merge step of a batch of crops (``reduce_units``)."""

    hidden: torch.Tensor  # (B, keep_first + kept * unit, D) the layer's hidden states after the merge
    result: MergeResult  # over units: kept (B, K) in source order, assign (B, units)
    scores: torch.Tensor  # (B, units) attention every unit received (mean over its tokens), float32
    weights: torch.Tensor | None = None  # (B, K, units) combination weights (``with_weights``), no gradient


def reduce_units(
    config,
    policy,
    layer: int,
    hidden: torch.Tensor,
    received: torch.Tensor,
    unit: int = 1,
    keep_first: int = 0,
    keys: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    with_weights: bool = False,
) -> UnitStep:
    """Remove and recycle ``config.removal_at(layer)`` units of every crop with ``policy``.

    ``hidden`` ``(B, N, D)``: ``keep_first`` tokens that stay as they are, then units of ``unit``
    consecutive tokens; ``received`` ``(B, N)`` the attention every token receives; ``keys``
    ``(B, N, K)`` the layer's keys (heads averaged; the similarity metric of matching policies);
    ``sizes`` ``(B, units)`` original units every unit stands for; ``grid`` the unit grid of the
    crops while the units are still all there in raster order (``None`` otherwise). A unit's score
    is the mean of its tokens'; recycling treats a unit's tokens position by position (one vector of
    ``unit * D``). ``with_weights``: also the weights of the combination, probed with an identity
    appended to the units (policies treat every column alike; a one-hot probe adds nothing to the
    dot products of distinct units).
    """
    b, _, d = hidden.shape
    head, body = hidden[:, :keep_first], hidden[:, keep_first:]
    units = body.shape[1] // unit
    attention = received[:, keep_first:].reshape(b, units, unit).float().mean(-1)
    r = removal_count(units, config.removal_at(layer), unit, layer, policy, config.strict)
    metric = None if keys is None else keys[:, keep_first:].reshape(b, units, -1)
    x = body.reshape(b, units, unit * d)
    if with_weights:
        x = torch.cat([x, torch.eye(units, dtype=x.dtype, device=x.device).expand(b, units, units)], -1)
    res = policy.reduce(
        "encoder", x, policy.scores("encoder", attention), r, config, metric=metric, sizes=sizes, grid=grid
    )
    weights = None
    if with_weights:
        weights = res.tokens[..., unit * d :].detach()
        res.tokens = res.tokens[..., : unit * d]
    kept = res.tokens.shape[1]
    return UnitStep(torch.cat([head, res.tokens.reshape(b, kept * unit, d)], dim=1), res, attention, weights)


def merge_units(
    config,
    policy,
    layer: int,
    hidden: torch.Tensor,
    received: torch.Tensor,
    unit: int = 1,
    keep_first: int = 0,
    keys: torch.Tensor | None = None,
    trace: CropTrace | None = None,
    record: bool = False,
) -> tuple[torch.Tensor, CropTrace]:
    """One merge step of a batch of crops (``reduce_units``) and the trace after it.

    ``trace``: the crops' trace before the step (``None``: no merge yet, every unit there in raster
    order of a square grid); ``record``: add the step to the trace's ``records``. Returns the hidden
    states after the merge and the new trace.
    """
    units = (hidden.shape[1] - keep_first) // unit
    step = reduce_units(
        config,
        policy,
        layer,
        hidden,
        received,
        unit,
        keep_first,
        keys,
        sizes=trace.sizes if trace is not None else None,
        grid=square_grid(units) if trace is None else None,
    )
    trace = trace if trace is not None else CropTrace.start(hidden.shape[0], units, hidden.device)
    return step.hidden, trace.step(layer, step.result, step.scores, record)


def scores_by_cls(policy, keep_first: int) -> bool:
    """Whether the encoder stage scores by the CLS token's attention: the policy asks for it
    (``encoder_query == "cls"``: VisionZip) and the tower has one (``keep_first`` > 0)."""
    return keep_first > 0 and getattr(policy, "encoder_query", "all") == "cls"


def attend_and_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    cls: bool = False,
    scores: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of a ViT merge layer and the attention every token receives, for both engines.

    ``query`` / ``key`` / ``value`` ``(B, H, N, hd)``; ``bias``: additive, broadcastable to the logits
    (ToMe's ``size_bias``). Returns the output ``(B, N, H, hd)`` and ``received`` ``(B, N)`` float32:
    by default the mean over heads and queries of the softmax that made the output (one pass,
    ``attention_with_received_scores``); ``cls``: the attention received from the first token instead
    (``cls_received``: VisionZip on a tower with a CLS token); ``scores=False`` (a policy that ignores
    them: ToMe): fused attention, the scores zeros."""
    if not scores:
        mask = None if bias is None else bias.to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous(), query.new_zeros(query.shape[0], query.shape[2], dtype=torch.float32)
    out, received = attention_with_received_scores(query, key, value, scale, bias)
    if cls:
        received = cls_received(query, key, scale, bias)
    return out, received


def to_block_order(
    hidden: torch.Tensor, received: torch.Tensor, keys: torch.Tensor, unit: int, keep_first: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens of square crops (``keep_first`` tokens, then patches in raster order) with the
    patches of every ``k x k`` unit made consecutive (``unit = k * k``; block order, ``block_order``):
    what a ViT merge layer does before its first merge when its units are blocks. Attention does not
    depend on the order; positions were added at the embeddings. ``unit == 1``: unchanged."""
    if unit == 1:
        return hidden, received, keys
    side = round((hidden.shape[1] - keep_first) ** 0.5)
    patches = block_order(side, round(unit**0.5), hidden.device) + keep_first
    order = torch.cat([torch.arange(keep_first, device=hidden.device), patches])
    return hidden[:, order], received[:, order], keys[:, order]


def frames_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scale: float,
    sizes: torch.Tensor | None = None,
    unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention frame by frame over a packed sequence (Qwen-VL's vision blocks), with the attention
    every token receives: ``query`` / ``key`` / ``value`` ``(S, H, hd)``, frame ``f`` the tokens
    ``bounds[f]:bounds[f + 1]``; ``sizes`` ``(S // unit,)``: original units every unit stands for
    (ToMe's proportional attention; ``None``: none). Returns the output ``(S, H * hd)`` and
    ``received`` ``(S,)`` float32."""
    n = query.shape[0]
    bias = size_bias(sizes[None].to(query.device), n, unit)[0, 0, 0] if sizes is not None else None
    outputs, received = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        frame_bias = bias[a:b][None, None, None] if bias is not None else None
        out, score = attention_with_received_scores(
            *(t[a:b].transpose(0, 1)[None] for t in (query, key, value)), scale, frame_bias
        )
        outputs.append(out[0])
        received.append(score[0])
    return torch.cat(outputs).reshape(n, -1), torch.cat(received)


@dataclass
class FrameStep:
    """One frame after a merge step of ``merge_frames``."""

    kept: torch.Tensor  # its surviving units (indices into all the units before the step)
    tokens: torch.Tensor  # (kept * unit, D) hidden states
    assign: torch.Tensor  # output unit (in the frame) of every unit of the frame before the step, -1: dropped
    sizes: torch.Tensor  # original units every survivor stands for
    scores: torch.Tensor  # the frame's units' scores before the step


@dataclass
class FramesStep:
    """A merge step of the frames of a packed sequence (``merge_frames``)."""

    frames: list[FrameStep]  # in order
    # with weights: (frames, their units before (frames, units), the weights (frames, kept, units)) per group
    groups: list[tuple[list[int], torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat([f.tokens for f in self.frames])

    @property
    def kept(self) -> torch.Tensor:
        return torch.cat([f.kept for f in self.frames])

    @property
    def sizes(self) -> torch.Tensor:
        return torch.cat([f.sizes for f in self.frames])

    @property
    def counts(self) -> list[int]:
        return [f.kept.numel() for f in self.frames]


def merge_frames(
    config,
    policy,
    layer: int,
    hidden: torch.Tensor,
    received: torch.Tensor,
    keys: torch.Tensor,
    frame_units: list[int],
    unit: int,
    sizes: torch.Tensor | None = None,
    grids: list[tuple[int, int] | None] | None = None,
    with_weights: bool = False,
) -> FramesStep:
    """One merge step of the frames of a packed sequence (Qwen-VL's vision blocks), the same in both
    engines: frame ``f`` holds ``frame_units[f]`` consecutive units of ``unit`` tokens; ``hidden``
    ``(S, D)``, ``received`` ``(S,)``, ``keys`` ``(S, K)``; ``sizes`` ``(units,)`` original units every
    unit stands for (``None``: 1 each); ``grids``: every frame's unit grid while its units are in
    raster order (``None``: not). Frames of one unit count and grid go through ``reduce_units``
    together, a crop per frame; ``with_weights``: their combination weights too (``FramesStep.groups``)."""
    device = hidden.device
    starts = torch.tensor([0, *frame_units]).cumsum(0)[:-1]
    sizes = (sizes if sizes is not None else torch.ones(sum(frame_units))).to(device)
    groups: dict[tuple, list[int]] = {}
    for f, size in enumerate(frame_units):
        groups.setdefault((size, grids[f] if grids is not None else None), []).append(f)
    frames: dict[int, FrameStep] = {}
    weights = []
    for (size, grid), group in groups.items():
        index = starts[group].to(device)[:, None] + torch.arange(size, device=device)  # (frames, units)
        tokens = (index[..., None] * unit + torch.arange(unit, device=device)).flatten(1)
        step = reduce_units(
            config, policy, layer, hidden[tokens], received[tokens], unit, 0, keys[tokens],
            sizes=sizes[index], grid=grid, with_weights=with_weights,
        )  # fmt: skip
        merged = merged_sizes(sizes[index], step.result, size)
        kept = index.gather(1, step.result.kept)
        for i, f in enumerate(group):
            frames[f] = FrameStep(kept[i], step.hidden[i], step.result.assign[i], merged[i], step.scores[i])
        if with_weights:
            weights.append((group, index, step.weights))
    return FramesStep([frames[f] for f in range(len(frame_units))], weights)
