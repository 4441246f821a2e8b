"""iLLaVA on a tiny random-weight LLaVA-NeXT (LLaVA-1.6: CLIP read at layer -2, CLS dropped, AnyRes
base view + crops, unpadding, a newline after every row) against stock transformers (the shared
behaviour, every generate mode, viz, runs in the family-parametrized test modules)."""

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava import IllavaConfig
from illava.patch import Hook
from illava.policy import Policy
from illava.testing import InvertedScores

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
TWO_Q = chat("<image>\n<image>\ncompare the two")
TEXT_Q = chat("describe a cat in one two three words")
FAM = next(f for f in FAMILIES if f.name == "llava_next")
SIDE = 8  # tiny config: 64 px views, 8 px patches -> 64 patches per view (+ CLS in the encoder)


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def greedy(model, inputs, n=5):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=[1, 2])


class KeepPatches(Policy):
    """Encoder scores by patch index (``order``: which patches are kept); the LLM stage scores
    as the paper does. Makes the survivors of every view known in advance."""

    def __init__(self, order: str = "first"):
        self.order = order

    def scores(self, stage, attention):
        if stage != "encoder":
            return attention
        index = torch.arange(attention.shape[1], dtype=attention.dtype, device=attention.device)
        return (-index if self.order == "first" else index).expand_as(attention)


@pytest.fixture(scope="module")
def shapes(photos):
    """A wide and a tall image: 100x40 and 40x100 pixels (width x height)."""
    return {"wide": photos["coffee"].resize((100, 40)), "tall": photos["rocket"].resize((40, 100))}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_off_removed_and_disabled_give_stock_logits_and_generation(photos, shapes, attn):
    model = FAM.make(attn)
    inputs = FAM.build([IMAGE_Q, TEXT_Q, IMAGE_Q], [photos["cat"], shapes["tall"]])
    ref, ref_gen = logits(model, inputs), greedy(model, inputs)
    illava.apply(model, "off")
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.apply(model, FAM.both_stages(llm_layers=(1, 2)), enabled=False)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.set_enabled(model, True)
    reduced = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    stock = int((inputs["input_ids"] == 1).sum())
    assert reduced.shape == ref.shape and tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"] == stock
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    assert not any("Illava" in type(m).__name__ for m in model.modules())
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert not any(isinstance(h, Hook) for h in hooks)


def test_stock_placeholder_counts_by_hand(shapes):
    """wide 100x40 -> best pinpoint 64x128 (1x2 crops, 8x16 patches); aspect 2.5 > 2: the height
    is cut to round(40 * 16 / 100) = 6 rows, padding (8 - 6) // 2 = 1 row each side:
    64 (base) + 6 * 16 + 6 newlines = 166. tall 40x100 -> 128x64 (2x1 crops, 16x8 patches); width
    round(40 * 16 / 100) = 6 columns: 64 + 16 * 6 + 16 newlines = 176."""
    inputs = FAM.build([IMAGE_Q, IMAGE_Q], [shapes["wide"], shapes["tall"]])
    assert inputs["pixel_values"].shape == (2, 3, 3, 64, 64)  # base + 2 crops each
    assert inputs["image_sizes"].tolist() == [[40, 100], [100, 40]]
    assert (inputs["input_ids"] == 1).sum(1).tolist() == [166, 176]


@pytest.mark.parametrize(
    "shape, llm_in, llm_out",
    [
        # 48 base survivors; crop survivors are rows 0-5 of each crop: rows 1-5 of the 8x16 grid are
        # inside the unpadded window (rows 1-6): 5 * 16; 6 newlines (window row 6 is left empty)
        ("wide", 48 + 5 * 16 + 6, 67),
        # crop rows 0-5 and 8-13 of the 16x8 grid, 6 unpadded columns (1-6): 12 * 6; 16 newlines
        ("tall", 48 + 12 * 6 + 16, 68),
    ],
)
def test_exact_counts_per_stage(shapes, shape, llm_in, llm_out):
    """16 of 64 patches removed at layer 1 in every view, keeping the first 48 (rows 0-5); the
    LLM keeps half of the image's tokens at layer 2 (round half up)."""
    model = FAM.make()
    policy = KeepPatches("first")
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=16, llm_layers=(2,), llm_keep_ratio=0.5,
                                     recycle="prune", policy=policy))  # fmt: skip
    inputs = FAM.build([IMAGE_Q], [shapes[shape]])
    logits(model, inputs)
    stats = illava.stats(model)
    (enc,) = stats.encoder
    assert enc["crops"] == 3 and enc["tokens"] == 3 * 65  # CLS + 64 patches per view
    assert enc["layers"] == [(1, 3 * 65, 3 * 49)]  # the CLS token is counted, never removed
    (item,) = stats.items
    assert (item.stock_tokens, item.tokens, item.crops) == ((166 if shape == "wide" else 176), llm_in, 3)
    assert stats.llm[0].visual_in == [llm_in] and stats.llm[0].visual_out == [llm_out]


def test_survivors_sit_where_stock_puts_their_patches(shapes):
    """Pruning 4 patches of every view at layer 4 (the last before the feature layer): every
    survivor's feature is its stock feature, at the place stock gives its patch (found by running
    stock ``pack_image_features`` on patch ids), newlines included; the removed ones are gone."""
    model = FAM.make()
    inputs = FAM.build([IMAGE_Q, IMAGE_Q], [shapes["wide"], shapes["tall"]])
    pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
    with torch.inference_mode():
        stock = model.model.get_image_features(pixels, sizes).pooler_output
    illava.apply(model, IllavaConfig(encoder_layers=(4,), encoder_removal=4, recycle="prune",
                                     policy=KeepPatches("last")))  # fmt: skip
    with torch.inference_mode():
        ours = model.model.get_image_features(pixels, sizes).pooler_output
    illava.remove(model)
    for n, (s, o) in enumerate(zip(stock, ours)):
        ids = (torch.arange(3)[:, None] * 64 + torch.arange(64)).float()[:, :, None]  # (views, patches, 1)
        packed = model.model.pack_image_features([ids], sizes[n : n + 1], "default", torch.full((1,), -1.0))[0][0][:, 0]
        removed = (packed >= 0) & (packed % 64 < 4)  # the 4 lowest patch ids of every view
        assert o.shape == s.shape
        present = ~o.isnan().all(-1)
        assert int(present.sum()) == int((~removed).sum())
        torch.testing.assert_close(o[present], s[~removed], atol=1e-5, rtol=1e-5)


def test_cls_is_never_removed(shapes):
    """The CLS token of every view stays in place with its stock state, even when all but one
    patch goes: the encoder's output at the layer read keeps CLS + 1 token per view."""
    model = FAM.make()
    inputs = FAM.build([IMAGE_Q], [shapes["wide"]])
    seen = {}

    def grab(module, args, kwargs, output):
        seen["hidden"] = output.hidden_states[-2]

    handle = model.model.vision_tower.register_forward_hook(grab, with_kwargs=True)
    with torch.inference_mode():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    stock = seen["hidden"]
    illava.apply(model, IllavaConfig(encoder_layers=(4,), encoder_removal=63, recycle="prune",
                                     policy=InvertedScores()))  # fmt: skip
    logits(model, inputs)
    handle.remove()
    ours = seen["hidden"]
    assert stock.shape == (3, 65, 32) and ours.shape == (3, 2, 32)
    torch.testing.assert_close(ours[:, 0], stock[:, 0], atol=1e-5, rtol=1e-5)
    assert illava.stats(model).encoder[0]["layers"] == [(4, 3 * 65, 3 * 2)]


@pytest.mark.parametrize("llm_layers", [(1,), (1, 2), (1, 2, 3)], ids=["1-llm-layer", "2-llm-layers", "3-llm-layers"])
def test_batch_equals_singles_mixed_sizes_and_text_only(photos, shapes, llm_layers):
    """Two images of different grids in one sample, a text-only sample, one image (left padded)."""
    model = FAM.make()
    illava.apply(model, FAM.both_stages(llm_layers=llm_layers, keep=0.7))
    prompts = [TWO_Q, TEXT_Q, IMAGE_Q]
    images = [[shapes["wide"], shapes["tall"]], [], [photos["cat"]]]
    batch = FAM.build(prompts, [im for group in images for im in group])
    assert (batch["attention_mask"] == 0).any()
    out = logits(model, batch)[:, -1]
    after = illava.stats(model).visual_tokens()
    total = 0
    for i, (prompt, group) in enumerate(zip(prompts, images)):
        alone = logits(model, FAM.build([prompt], group))[:, -1]
        torch.testing.assert_close(alone[0], out[i], atol=2e-4, rtol=2e-4, msg=f"sample {i}")
        if group:  # (a text-only forward publishes no visual statistics)
            total += illava.stats(model).visual_tokens()["after_llm"]
    assert total == after["after_llm"]


def test_presets_and_stock_layout_for_the_published_model(photos):
    from transformers import LlavaNextForConditionalGeneration

    from illava.tools.families.llava_next import image_token_count, llava_next_config
    from illava.tools.inputs import placeholder_inputs

    config = llava_next_config("vicuna-7b")
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    dims = illava.adapters.adapter_for(model).dimensions(model)
    assert (dims.encoder_depth, dims.tokens_per_crop, dims.llm_depth, dims.feature_layer) == (24, 576, 32, 22)
    cfg = illava.configure(model, "image")
    assert (cfg.encoder_layers, cfg.encoder_removal, cfg.llm_layers, cfg.llm_keep_ratio) == (
        (5, 6, 7, 8),
        72,
        (9,),
        0.7,
    )
    video = illava.configure(model, "video")  # no video in this class: the image preset
    assert (video.encoder_layers, video.encoder_removal, video.llm_layers) == ((5, 6, 7, 8), 72, (9,))
    # 1280x720 -> 672x672 (2x2 crops, 48x48 patches); height round(720 * 48 / 1280) = 27, padding
    # 10 rows each side: 28 rows kept -> 576 + 28 * 48 + 28 = 1948
    inputs = placeholder_inputs(config, [photos["coffee"].resize((1280, 720))])
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert int((inputs["input_ids"] == 32000).sum()) == 1948 == image_token_count(config, (720, 1280))


def test_encoder_stage_refusals():
    from transformers import LlavaNextForConditionalGeneration

    from illava.tools.families.llava_next import tiny_llava_next_config

    model = FAM.make()
    with pytest.raises(ValueError, match=r"comes after the layer the model reads its visual features from \(4\)"):
        illava.apply(model, IllavaConfig(encoder_layers=(5,), encoder_removal=4))
    config = tiny_llava_next_config()
    config.vision_feature_select_strategy = "full"
    model = LlavaNextForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="needs vision_feature_select_strategy='default'"):
        illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4))
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(model_type="siglip_vision_model")).eval()
    with pytest.raises(ValueError, match="needs a CLIP vision tower"):
        illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4))
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))  # the LLM stage still works
    # DINOv2 has the LLaVA-1.5 encoder stage only (tests/test_llava_dinov2.py), not LLaVA-NeXT's
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(model_type="dinov2")).eval()
    with pytest.raises(ValueError, match="needs a CLIP vision tower; this model's is Dinov2Model"):
        illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4))
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))


def test_no_video(photos):
    with pytest.raises(ValueError, match="takes no video"):
        FAM.build([chat("<video>\nwhat happens?")], (), [[photos["cat"]] * 2])
