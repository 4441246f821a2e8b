"""How the stages pick tokens and fold the removed ones into survivors: a parameter of the stages.

Both stages call the configuration's policy (``IllavaConfig.policy``; ``None`` means ``Policy()``,
the paper's) at every merge:

- ``scores(stage, attention)`` turns the attention statistic the stage measured into importance
  (``stage`` is ``"encoder"``: attention each token receives from its crop / frame; or ``"llm"``:
  attention the last prompt token pays each visual token);
- ``reduce(stage, x, scores, r, config)`` removes ``r`` tokens of every row of ``x`` ``(B, N, D)``
  and returns an ``illava.merge.MergeResult`` (survivors in their original order, and the output
  token that represents every input token, for source tracking).

Write another method by subclassing ``Policy``; it plugs into every family through the same two
calls. Policies are pure functions of their inputs and must not keep per-call state.
"""

from __future__ import annotations

import torch

from .merge import MergeResult, merge


class Policy:
    """The paper's policy: score by attention, recycle with ``config.recycle`` (docs/method.md)."""

    name = "illava"

    def scores(self, stage: str, attention: torch.Tensor) -> torch.Tensor:
        return attention

    def reduce(self, stage: str, x: torch.Tensor, scores: torch.Tensor, r: int, config) -> MergeResult:
        return merge(
            x,
            scores,
            r,
            config.recycle,
            neighbours=config.cluster_neighbours,
            recycle_fraction=config.cluster_fraction,
        )

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class InvertedScores(Policy):
    """Deliberately broken: keeps the tokens the real scores rank *lowest*, without recycling.

    A fidelity check must see this lose accuracy clearly; if it does not, the check cannot tell a
    good scorer from a bad one (``illava eval easy-vqa`` reports it as the control row).
    """

    name = "inverted"

    def scores(self, stage: str, attention: torch.Tensor) -> torch.Tensor:
        return -attention

    def reduce(self, stage: str, x: torch.Tensor, scores: torch.Tensor, r: int, config) -> MergeResult:
        return merge(x, scores, r, "prune")


DEFAULT = Policy()


def policy_of(config) -> Policy:
    return config.policy if config.policy is not None else DEFAULT
