"""Encoder merge layers chosen by measurement: the engine-neutral half (``illava.tools.schedule`` measures).

- ``Profile``: the received-attention *lift* of every mergeable encoder layer of a tower (the share
  of a crop's received attention held by its top 10 % of units, over 10 %; 1.0: flat);
- ``choose_layers``: the rule (docs/method.md, "Where the encoder stage merges"): from the tower's
  flattest layer on, the first layer whose lift has climbed half of the way from that minimum to the
  highest lift after it starts ``count`` consecutive mergeable layers;
- ``remember`` / ``measured_layers``: the profile measured for a model, read by the
  ``illava-measured`` method and by ``illava.configure(model, ..., encoder_layers="measured")``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

TOP_SHARE = 0.10  # the top tenth of a crop's units
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Profile


@dataclass
class Profile:
    layers: tuple[int, ...]  # mergeable encoder layers, in order
    lift: tuple[float, ...]  # received-attention lift of every layer (1.0: flat)
    images: int  # images measured

    def table(self) -> list[tuple[int, float]]:
        return list(zip(self.layers, self.lift))


def lift(scores: torch.Tensor, top: float = TOP_SHARE) -> float:
    """Share of ``scores`` (one crop's units, non-negative) held by its top ``top`` fraction of units,
    over ``top`` (1.0 when every unit receives the same attention)."""
    scores = scores.float().clamp(min=0)
    total = scores.sum()
    if scores.numel() == 0 or total <= 0:
        return 1.0
    k = max(1, math.ceil(top * scores.numel()))
    return float(scores.topk(k).values.sum() / total) / (k / scores.numel())


def choose_layers(profile: Profile, count: int, threshold: float = 0.5) -> tuple[int, ...]:
    """``count`` consecutive mergeable layers starting, from the flattest layer on, at the first layer
    whose lift has climbed ``threshold`` of the way from that lowest lift to the highest after it
    (module docstring)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    layers, lifts = list(profile.layers), list(profile.lift)
    count = max(1, min(count, len(layers)))
    flattest = min(range(len(lifts)), key=lambda i: (lifts[i], i))
    low, high = lifts[flattest], max(lifts[flattest:])
    level = low + threshold * (high - low)
    start = next(i for i in range(flattest, len(lifts)) if lifts[i] >= level - 1e-12)
    start = min(start, len(layers) - count)
    return tuple(layers[start : start + count])


def measured_layers(model, count: int, threshold: float = 0.5) -> tuple[int, ...]:
    """``choose_layers`` on the profile ``measure`` remembered for ``model``; ``ValueError`` saying what
    to run when there is none."""
    profile = _MEASURED.get(model)
    if profile is None:
        raise ValueError(
            "illava-measured: no layer profile for this model; run illava.tools.schedule.measure(model, tokenizer, "
            "image_processor) first (the shipped sample photos, or your own images=...)"
        )
    return choose_layers(profile, count, threshold)


def remember(model, profile: Profile) -> None:
    """Use ``profile`` for ``model`` (a profile measured elsewhere, e.g. read from JSON)."""
    _MEASURED[model] = profile
