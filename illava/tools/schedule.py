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

import torch

from .. import api
from ..config import IllavaConfig
from ..plan.schedule import _MEASURED, TOP_SHARE, Profile, choose_layers, lift, measured_layers, remember

__all__ = [
    "TOP_SHARE",
    "Profile",
    "choose_layers",
    "layer_profile",
    "lift",
    "measure",
    "measured_layers",
    "remember",
    "sample_images",
]


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
    for unit_trace in forward.units.values():
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
    from .viz import units_of

    units_of(model, forward)
    return forward


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
