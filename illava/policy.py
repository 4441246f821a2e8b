"""How the stages pick tokens and fold the removed ones into survivors: a parameter of the stages.

Every stage calls the configuration's policy (``IllavaConfig.policy``; ``None`` means ``Policy()``,
the paper's):

- ``scores(stage, attention)`` turns the attention statistic the stage measured into importance
  (``stage`` is ``"encoder"``: attention each unit receives from its crop / frame; or ``"llm"``:
  attention the scoring query pays each visual token: the last token of its sequence, or every
  query when ``llm_query == "all"``);
- ``reduce(stage, x, scores, r, config, metric=, sizes=, grid=)`` removes ``r`` tokens of every row
  of ``x`` ``(B, N, D)`` and returns an ``illava.merge.MergeResult`` (survivors in their original
  order, and the output token that represents every input token, for source tracking); ``metric``
  are the keys (encoder stage), ``sizes`` how many original units every token stands for,
  ``grid`` the unit grid of a crop when the family has one;
- ``max_removal(n)``: the most units one encoder step may remove from a crop / frame of ``n``
  units (all but one by default; ToMe: half, its matching's bound): a larger configured count is
  capped to it (``illava.plan.encoder.removal_count``), so small inputs are reduced less, never
  refused;
- ``kept(n, r, grid)``: how many of ``n`` tokens ``reduce`` leaves when asked to remove ``r``
  (``n - r`` unless the policy says otherwise): the count a serving engine reserves before the
  model runs (``illava.plan.encoder.units_after``);
- ``select(x, m)`` (the feature stage, ``IllavaConfig.feature_keep``) picks which ``m`` of the
  projected tokens ``x`` ``(N, D)`` of one image / video enter the LLM.

``proportional_attention``: later encoder layers add ``log(size)`` to the attention logits of every
token (ToMe). Write another method by subclassing ``Policy``; it plugs into every family through
these calls. Policies are pure functions of their inputs and keep no per-call state. The peers are
written from their papers' descriptions (docs/peers.md).
"""

from __future__ import annotations

import torch

from .merge import MergeResult, merge
from .peers import bipartite_merge, cells_for, diverse_subset, dominant_contextual, grid_pool


class Policy:
    """The paper's policy: score by attention, recycle with ``config.recycle`` (docs/method.md)."""

    name = "illava"
    llm_query = "last"
    proportional_attention = False
    # encoder stage: "all": a unit's score is the attention it receives from every query of its crop;
    # "cls": from the crop's CLS token (towers that have one; others fall back to "all")
    encoder_query = "all"
    # False: ``reduce`` ignores the encoder scores (ToMe matches keys), so the transformers backend runs
    # the merge layers' attention fused (SDPA) instead of with an explicit softmax, unless recording
    uses_encoder_scores = True

    def scores(self, stage: str, attention: torch.Tensor) -> torch.Tensor:
        return attention

    def reduce(self, stage: str, x: torch.Tensor, scores: torch.Tensor, r: int, config, **context) -> MergeResult:
        return merge(
            x,
            scores,
            r,
            config.recycle,
            neighbours=config.cluster_neighbours,
            recycle_fraction=config.cluster_fraction,
        )

    def max_removal(self, n: int) -> int:
        """The most units one encoder step may remove from ``n``: all but one."""
        return max(0, n - 1)

    def kept(self, n: int, r: int, grid: tuple[int, int] | None = None) -> int:
        return n - r

    def select(self, x: torch.Tensor, m: int) -> torch.Tensor:
        raise ValueError(f"the {self.name} policy does not select tokens before the LLM (feature_keep)")

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Pruning(Policy):
    """Score by attention, drop the rest (no recycling): FastV and PyramidDrop.

    ``llm_query``: ``"all"`` scores a token by the attention it receives from every query (FastV's
    paper), ``"last"`` by the last token's attention (FastV's public code; PyramidDrop).
    """

    def __init__(self, name: str = "prune", llm_query: str = "last"):
        if llm_query not in ("last", "all"):
            raise ValueError(f"llm_query must be 'last' or 'all', got {llm_query!r}")
        self.name = name
        self.llm_query = llm_query

    def reduce(self, stage, x, scores, r, config, **context) -> MergeResult:
        return merge(x, scores, r, "prune")


def FastV(llm_query: str = "all") -> Pruning:  # noqa: N802 - a policy, named as the method
    return Pruning("fastv", llm_query)


def PDrop() -> Pruning:  # noqa: N802
    return Pruning("pdrop", "last")


class ToMe(Policy):
    """Bipartite soft matching of keys, size-weighted merging, proportional attention (ToMe)."""

    name = "tome"
    proportional_attention = True
    uses_encoder_scores = False

    def reduce(self, stage, x, scores, r, config, metric=None, sizes=None, **context) -> MergeResult:
        return bipartite_merge(x, x if metric is None else metric, r, sizes)

    def max_removal(self, n: int) -> int:
        return n // 2  # a match per token of the smaller set (odd positions) at most: ToMe's bound

    def kept(self, n, r, grid=None) -> int:
        return n - min(r, n // 2)


class ToMeThenIllava(ToMe):
    """The paper's two-stage schedule with another encoder policy: ToMe's matching (and proportional
    attention) at the encoder stage's layers, the paper's text-guided scoring and recycling at the LLM
    stage."""

    name = "tome-illava"

    def reduce(self, stage, x, scores, r, config, **context) -> MergeResult:
        if stage == "encoder":
            return super().reduce(stage, x, scores, r, config, **context)
        return Policy.reduce(self, stage, x, scores, r, config, **context)


class VisionZip(Policy):
    """Dominant tokens by attention received, the others merged into evenly spaced contextual
    targets by key similarity; ``dominant_share`` of the kept tokens are dominant (54 of 64 in the
    paper's settings: 5.4 to 1). As in its paper, the attention is the CLS token's on towers that have
    one (CLIP, DINOv2, InternViT), every query's where there is none (SigLIP, Qwen-VL)."""

    name = "visionzip"
    encoder_query = "cls"

    def __init__(self, dominant_share: float = 54 / 64):
        self.dominant_share = dominant_share

    def reduce(self, stage, x, scores, r, config, metric=None, **context) -> MergeResult:
        kept = x.shape[1] - r
        dominant = min(kept, round(self.dominant_share * kept))
        return dominant_contextual(x, scores, dominant, kept - dominant, metric)


class RandomScores(Policy):
    """Control: the paper's stages (same layers, counts and recycling) ranking by random scores
    instead of attention. Fixed seed: the same scores for the same number of units, whatever the
    batch (so a batch equals its samples alone)."""

    name = "random-scores"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, stage: str, attention: torch.Tensor) -> torch.Tensor:
        n = attention.shape[-1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        row = torch.rand(n, generator=generator).to(attention.device)
        return row.expand_as(attention).clone()


class DivPrune(Policy):
    """A max-min diverse subset of the projected tokens of every image / video (DivPrune)."""

    name = "divprune"

    def select(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return diverse_subset(x, m)


class RandomDrop(Policy):
    """Control: a uniformly random subset of every image / video (fixed seed: the same subset for
    the same number of tokens, whatever the batch)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, x: torch.Tensor, m: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + x.shape[0])
        return torch.randperm(x.shape[0], generator=generator)[:m].sort().values.to(x.device)


class Pool(Policy):
    """Control: average pooling of every crop's unit grid to the kept count (1D runs of units when
    the family gives no grid)."""

    name = "pool"

    def reduce(self, stage, x, scores, r, config, grid=None, **context) -> MergeResult:
        n = x.shape[1]
        grid = grid if grid is not None and grid[0] * grid[1] == n else (1, n)
        return grid_pool(x, grid, cells_for(grid, n - r))

    def kept(self, n, r, grid=None) -> int:
        grid = grid if grid is not None and grid[0] * grid[1] == n else (1, n)
        cells = cells_for(grid, n - r)
        return cells[0] * cells[1]  # every cell holds a unit: cells_for never exceeds the grid


DEFAULT = Policy()


def policy_of(config) -> Policy:
    return config.policy if config.policy is not None else DEFAULT
