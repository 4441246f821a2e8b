"""No image too small (issue 42): on every dynamic-resolution family, every preset and every method, at
its default knob and at its most reducing one, runs on images from the processor's minimum (one 2x2
grid of units) to large, wide ones and low-resolution video frames in one batch: the forward runs,
tokens are reduced, a batch equals its samples alone, and a removal a crop cannot give is capped
(at half the units for ToMe, all but one otherwise) and shown by ``illava.stats``."""

import copy
import dataclasses

import pytest
import torch
from families import FAMILIES, chat
from PIL import Image

import illava
from illava import IllavaConfig
from illava.methods import METHODS, REGISTRY
from illava.plan.encoder import removal_count, units_after
from illava.policy import Policy, ToMe
from illava.tools import schedule

DYNAMIC = [f for f in FAMILIES if f.name.startswith(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))]
IMAGE_Q = chat("<image>\nwhat is shown in this image?")
VIDEO_Q = chat("<video>\nwhat happens?")
# (width, height): below the processor's minimum (resized up to 2x2 units), small, wide, large
SIZES = [(28, 28), (60, 40), (300, 40), (250, 230)]
# every preset and every method at its default knob and at its most reducing one
SETTINGS = [("preset", p, None) for p in ("image", "video", "encoder-only", "llm-only")] + [
    ("method", m, knob) for m in METHODS for knob in (REGISTRY[m].default, REGISTRY[m].high)
]


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module", params=DYNAMIC, ids=lambda f: f.name)
def fam(request):
    """The family with a processor allowing large images (the tiny configs cap them at ~112x168)."""
    fam = request.param
    config = copy.deepcopy(fam.config)
    unit_px = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    config.illava_processor = {"shortest_edge": 4 * unit_px**2, "longest_edge": 64 * unit_px**2}
    return dataclasses.replace(fam, _config=config)


@pytest.fixture(scope="module")
def model(fam):
    return fam.make()


def _logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs, logits_to_keep=1).logits[:, -1]


def _configure(model, kind, name, knob, fam=None):
    if name == "illava-measured":  # its layers come from the tower's measured attention
        schedule.remember(model, schedule.layer_profile(model, fam.build([IMAGE_Q], [_image(250, 230, 0)])))
    return illava.configure(model, name) if kind == "preset" else illava.configure(model, name, knob)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s[1]}@{s[2]}" if s[2] is not None else s[1])
def test_every_setting_runs_on_every_image_size_and_batch_equals_singles(fam, model, setting):
    config = illava.apply(model, _configure(model, *setting, fam=fam))
    images = [_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    frames = [_image(28, 28, 10 + i) for i in range(4)]  # a video at the processor's minimum resolution
    prompts = [IMAGE_Q] * len(images) + [VIDEO_Q]
    try:
        batch = _logits(model, fam.build(prompts, images, [frames]))
        stats = illava.stats(model)
        reduces = config.reduces  # False: a preset with no stage on this model (llm-only where the LLM stage is off)
        assert (stats.visual_tokens()["after_llm"] < stats.visual_tokens()["stock"]) == reduces, (setting, stats)
        for i, prompt in enumerate(prompts):
            single = fam.build([prompt], [images[i]] if i < len(images) else [], [frames] if i == len(images) else [])
            alone = _logits(model, single)
            tokens = illava.stats(model).visual_tokens()
            assert 1 <= tokens["after_llm"] <= tokens["stock"], (setting, i, tokens)
            where = f"{setting} sample {i}"
            torch.testing.assert_close(alone[0], batch[i], atol=2e-4, rtol=2e-4, msg=lambda m, w=where: f"{w}: {m}")
        # the largest image is reduced by every setting that reduces
        _logits(model, fam.build([IMAGE_Q], [images[-1]]))
        tokens = illava.stats(model).visual_tokens()
        assert (tokens["after_llm"] < tokens["stock"]) == reduces, (setting, tokens)
    finally:
        illava.remove(model)


def test_tome_default_on_the_smallest_image_is_capped_at_half_and_stats_say_so(fam, model):
    config = illava.apply(model, "tome")  # 8 units per layer: more than a 2x2-unit image has
    assert config.encoder_removal[0] == 32  # 8 units of 2x2 patches
    try:
        _logits(model, fam.build([IMAGE_Q], [_image(28, 28, 0)]))
        stats = illava.stats(model)
        enc = stats.encoder[0]
        units = enc["tokens"] // 4
        assert units == 4
        # 4 -> 2 -> 1 -> 1 ...: at most half the units of every layer go (ToMe's bound)
        expected = units
        for layer, n_in, n_out in enc["layers"]:
            assert n_in == expected * 4 and n_out == (expected - expected // 2) * 4, (layer, enc["layers"])
            expected -= expected // 2
        assert enc["capped"] and all(removed < asked for _, _, asked, removed in enc["capped"])
        assert "capped" in str(stats)
        assert stats.visual_tokens()["after_encoder"] == expected
    finally:
        illava.remove(model)


def test_strict_mode_raises_instead_of_capping(fam, model):
    illava.apply(model, illava.configure(model, "tome").replace(strict=True))
    try:
        with pytest.raises(ValueError, match="strict"):
            _logits(model, fam.build([IMAGE_Q], [_image(28, 28, 0)]))
        _logits(model, fam.build([IMAGE_Q], [_image(250, 230, 0)]))  # large enough: no cap, no error
    finally:
        illava.remove(model)


def test_one_rule_for_the_count_a_crop_gives():
    tome, default = ToMe(), Policy()
    assert removal_count(4, 32, 4, 0, tome) == 2  # 8 units asked, half of 4 given
    assert removal_count(5, 32, 4, 0, tome) == 2  # odd: the smaller set of the matching
    assert removal_count(64, 32, 4, 0, tome) == 8  # large enough: as configured
    assert removal_count(4, 32, 4, 0, default) == 3  # all but one
    assert removal_count(4, 0.9, 1, 0, default) == 3  # a fraction never removes the last unit
    assert removal_count(1, 8, 1, 0, default) == 0
    with pytest.raises(ValueError, match="lower encoder_removal"):
        removal_count(4, 32, 4, 0, tome, strict=True)
    # what a serving engine reserves: the same rule, layer after layer
    config = IllavaConfig(encoder_layers=(0, 1, 2, 3), encoder_removal=32, policy=tome)
    assert [units_after(config, tome, n, 4) for n in (1, 4, 9, 64, 256)] == [1, 1, 1, 32, 224]
    # an explicit count on a fixed-resolution model is capped too; strict checks it at configuration
    strict = IllavaConfig(encoder_layers=(0,), encoder_removal=1000, strict=True)
    with pytest.raises(ValueError, match="strict"):
        strict.check_against(encoder_depth=4, tokens_per_crop=16, llm_depth=4, feature_layer=3)
    strict.replace(strict=False).check_against(encoder_depth=4, tokens_per_crop=16, llm_depth=4, feature_layer=3)
