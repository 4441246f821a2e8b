"""Encoder merge layers chosen by measurement: where the tower's received attention already separates tokens.

The paper's principle for where the encoder stage merges: late enough that the attention a token
receives tells informative tokens apart, early enough to save the encoder's work. The published
settings (LLaVA-OneVision layers 5-8 of SigLIP's 26, Qwen2-VL 12-15 of 32) follow it; a depth-scaled
copy of them on another tower need not (DINOv2-S/14: its received attention is nearly flat in layers
1-4). This module measures instead:

- ``layer_profile``: for every mergeable encoder layer, the *lift* of the received attention: the
  share of a crop's received attention held by its top 10 % of units, over 10 % (1.0: flat; 3.0: the
  top tenth receives three times its share), the mean over the crops of a few images. It runs the
  model once with the encoder stage at every layer removing nothing and records the scores the stage
  itself computes (``illava.tools.viz.trace``), so it measures exactly what the stage ranks by.
- ``choose_layers``: the rule. From the tower's flattest layer on (the lowest lift: before it, a
  concentration comes from low-level features, e.g. DINOv2-S's layer 0 at 4.5), the first layer whose
  lift has climbed ``threshold`` (default half) of the way from that minimum to the highest lift after
  it starts the schedule; the schedule is ``count`` consecutive mergeable layers from there (moved
  earlier if they would pass the last mergeable layer).
- ``measure``: both, on the shipped sample photos (scikit-image) or the user's images, for a model and
  its tokenizer and image processor; the result is remembered for the model, which is what the
  ``illava-measured`` method (``illava.methods``) reads.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .. import api
from ..config import IllavaConfig

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


def layer_profile(model, inputs: dict, images: int = 0) -> Profile:
    """The lift of every mergeable encoder layer of ``model`` on ``inputs`` (model inputs holding
    ``images`` images). The model's own illava state is restored afterwards."""
    from ..adapters import adapter_for

    layers = tuple(adapter_for(model).mergeable_layers(model))
    previous = api.config_of(model) if api.is_applied(model) else None
    try:
        api.apply(model, IllavaConfig(encoder_layers=layers, encoder_removal=0))
        forward = _trace(model, inputs)
    finally:
        if previous is None:
            api.remove(model)
        else:
            api.apply(model, previous)
    lifts: dict[int, list[float]] = {layer: [] for layer in layers}
    for call in forward.calls.values():
        unit_trace = call.trace
        sizes = [rows * cols for rows, cols in unit_trace.grids]
        for layer, _, scores in unit_trace.layers:
            for crop in torch.split(scores, sizes):
                lifts[layer].append(lift(crop))
    return Profile(layers, tuple(sum(v) / len(v) if v else 1.0 for v in lifts.values()), images)


def _trace(model, inputs: dict):
    """The source tracking of one forward (the stage removes nothing: only the encoder calls' traces)."""
    state = model._illava.state
    with state.recording(), torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    forward = state.last_stats.trace
    if forward is None or not forward.calls:
        raise ValueError("illava.tools.schedule: the inputs hold no image or video")
    return forward


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


def sample_images() -> list:
    """The shipped sample photos: scikit-image's astronaut, cat, coffee and rocket."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(f()).convert("RGB") for f in (data.astronaut, data.chelsea, data.coffee, data.rocket)]


def measure(model, tokenizer, image_processor=None, images=None, prompt: str | None = None) -> Profile:
    """``layer_profile`` of ``model`` on ``images`` (default: ``sample_images()``), one image per
    sample, with the chat format of the shipped models (``prompt``: a ``<image>`` marker and a
    question); remembered for ``measured_layers``."""
    from .inputs import build, for_model

    images = list(images) if images is not None else sample_images()
    prompt = prompt or "<|im_start|>user\n<image>\nwhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
    inputs = build(model.config, tokenizer, [prompt] * len(images), images, image_processor=image_processor)
    inputs = for_model(inputs, model)
    profile = layer_profile(model, inputs, len(images))
    _MEASURED[model] = profile
    return profile


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
