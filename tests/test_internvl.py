"""iLLaVA on a tiny random-weight InternVL against stock transformers (the shared behaviour, batch ==
singles, every generate mode, viz, runs in the family-parametrized test modules)."""

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava import IllavaConfig
from illava.adapters.internvl import block_order
from illava.patch import Hook

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
FAM = next(f for f in FAMILIES if f.name == "internvl")


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disabled_and_removed_give_stock_logits(photos, frames, attn):
    model = FAM.make(attn)
    inputs = FAM.build([IMAGE_Q, chat("<video>\nwhat happens?")], [photos["cat"]], [frames])
    ref = logits(model, inputs)
    illava.apply(model, "image", enabled=False)
    assert torch.equal(logits(model, inputs), ref)
    illava.set_enabled(model, True)
    reduced = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert reduced.shape == ref.shape and tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"]
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref)
    assert not any("Illava" in type(m).__name__ for m in model.modules())
    # (stock InternVL installs its own output-capturing hooks on the first forward)
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert not any(isinstance(h, Hook) for h in hooks)


def test_block_order_is_the_pixel_shuffle_grouping():
    """Blocks are the 2x2 neighbourhoods the pixel shuffle folds into one token, in its output order."""
    model = FAM.make()
    side = 8
    features = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
    shuffled = model.model.pixel_shuffle(features, 0.5).reshape(-1, 4)  # (16 tokens, 4 patches)
    order = block_order(side)
    assert torch.equal(shuffled.sort(-1).values, order.float().sort(-1).values)


def test_counts_per_stage_tiles_cls_and_whole_blocks(photos):
    model = FAM.make()
    illava.apply(
        model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=(8, 0.25), llm_layers=(2,), llm_keep_ratio=0.5)
    )
    inputs = FAM.build([IMAGE_Q], [photos["cat"]])
    logits(model, inputs)
    stats = illava.stats(model)
    (enc,) = stats.encoder
    tiles = inputs["pixel_values"].shape[0]
    assert enc["crops"] == tiles == 3 and enc["tokens"] == tiles * 65  # CLS + 8x8 patches per tile
    # layer 1: 8 tokens = 2 blocks; layer 3: 25% of the 14 blocks left = 4 blocks (round half up)
    assert [(layer, a // tiles, b // tiles) for layer, a, b in enc["layers"]] == [(1, 65, 57), (3, 57, 41)]
    (item,) = stats.items
    assert item.stock_tokens == tiles * 16 and item.tokens == tiles * 10 and item.crops == tiles
    assert stats.llm[0].visual_out == [round(0.5 * item.tokens)]


def test_cls_stays_and_survivors_equal_stock_features_at_their_slots(photos):
    """Pruning at the last layer changes nothing for survivors: their features must equal stock
    ones at the same LLM slots (checks block order, the raster scatter and the pixel shuffle), the
    CLS token is never removed, and removed blocks are NaN rows."""
    model = FAM.make()
    inputs = FAM.build([IMAGE_Q], [photos["rocket"]])
    pixels = inputs["pixel_values"]
    with torch.inference_mode():
        stock = model.model.get_image_features(pixels).pooler_output
        stock_cls = model.model.vision_tower(pixels).last_hidden_state[:, 0]
    last = model.config.vision_config.num_hidden_layers - 1
    illava.apply(model, IllavaConfig(encoder_layers=(last,), encoder_removal=0.4, recycle="prune"))
    with torch.inference_mode():
        ours = model.model.get_image_features(pixels).pooler_output
        cls = model.model.vision_tower(pixels).last_hidden_state[:, 0]
    assert ours.shape == stock.shape
    valid = ~ours.isnan().all(-1)
    assert (valid.sum(1) == 16 - round(0.4 * 16)).all()
    torch.testing.assert_close(ours[valid], stock[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, stock_cls, atol=1e-5, rtol=1e-5)


def test_video_frames_are_tiles(frames):
    """A video is one tile per frame, each between its own <img> ... </img>: an image span per frame."""
    model = FAM.make()
    illava.apply(model, "video")
    inputs = FAM.build([chat("<video>\nwhat happens?")], (), [frames])
    assert inputs["pixel_values"].shape[0] == len(frames)
    logits(model, inputs)
    items = illava.stats(model).items
    assert len(items) == len(frames)
    assert all(i.stock_tokens == 16 and i.crops == 1 and i.tokens < 16 for i in items)


def test_presets_for_published_sizes():
    from transformers import InternVLForConditionalGeneration

    from illava.tools.families.internvl import internvl_config

    # InternViT-6B has 45 layers and InternLM2.5-20B 48: layers scale with depth
    for size, encoder, llm in (("8b", (5, 6, 7, 8), (9,)), ("26b", (9, 11, 13, 15), (14,))):
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(internvl_config(size))
        cfg = illava.configure(model, "image")
        assert cfg.encoder_layers == encoder and cfg.encoder_removal == 128 and cfg.llm_layers == llm
        assert cfg.llm_keep_ratio == 0.7


def test_other_feature_layers_refuse_the_encoder_stage():
    from transformers import InternVLForConditionalGeneration

    from illava.tools.architectures import tiny_config

    cfg = tiny_config("tiny-internvl")
    cfg.vision_feature_layer = -2
    model = InternVLForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="vision_feature_layer=-1"):
        illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4))
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))  # the LLM stage still works
