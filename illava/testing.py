"""Controls for tests and accuracy checks: deliberately broken policies, not for real use
(``illava.apply(model, "image", policy=illava.testing.InvertedScores())``)."""

from __future__ import annotations

import torch

from .merge import MergeResult, merge
from .policy import Policy


class InvertedScores(Policy):
    """Deliberately broken: keeps the tokens the real scores rank *lowest*, without recycling.

    A fidelity check must see this lose accuracy clearly; if it does not, the check cannot tell a
    good scorer from a bad one (``illava eval easy-vqa`` reports it as the control row).
    """

    name = "inverted"

    def scores(self, stage: str, attention: torch.Tensor) -> torch.Tensor:
        return -attention

    def reduce(self, stage, x, scores, r, config, **context) -> MergeResult:
        return merge(x, scores, r, "prune")
