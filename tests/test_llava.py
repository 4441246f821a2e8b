"""iLLaVA on a tiny random-weight LLaVA-1.5 (CLIP read at layer -2, CLS dropped) against stock
transformers (the shared behaviour, batch == singles, every generate mode, viz, runs in the
family-parametrized test modules)."""

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava import IllavaConfig
from illava.patch import Hook

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
TWO_Q = chat("<image>\n<image>\ncompare the two")
TEXT_Q = chat("describe a cat in one two three words")
FAM = next(f for f in FAMILIES if f.name == "llava")
SIDE = 8  # tiny config: 64 px images, 8 px patches -> 64 patches (+ CLS in the encoder)


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def greedy(model, inputs, n=5):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=[1, 2])


def full_strategy_model(seed=0):
    """The tiny LLaVA with ``vision_feature_select_strategy='full'`` (the CLS feature kept)."""
    config = FAM.config.__class__.from_dict(FAM.config.to_dict())
    config.vision_feature_select_strategy = "full"
    torch.manual_seed(seed)
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(config).eval(), config


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_off_removed_and_disabled_give_stock_logits_and_generation(photos, attn):
    model = FAM.make(attn)
    inputs = FAM.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    ref, ref_gen = logits(model, inputs), greedy(model, inputs)
    illava.apply(model, "off")
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.apply(model, FAM.both_stages(llm_layers=(1, 2)), enabled=False)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.set_enabled(model, True)
    reduced = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert reduced.shape == ref.shape and tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"] == 64
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    assert not any("Illava" in type(m).__name__ for m in model.modules())
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert not any(isinstance(h, Hook) for h in hooks)


def test_exact_counts_per_stage_two_images(photos):
    model = FAM.make()
    illava.apply(
        model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=(8, 0.25), llm_layers=(2,), llm_keep_ratio=0.5)
    )
    inputs = FAM.build([TWO_Q, IMAGE_Q], [photos["cat"], photos["rocket"], photos["coffee"]])
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)
    assert (inputs["input_ids"] == 1).sum(1).tolist() == [128, 64]  # 64 placeholders per image
    logits(model, inputs)
    stats = illava.stats(model)
    (enc,) = stats.encoder
    assert enc["crops"] == 3 and enc["tokens"] == 3 * 65  # CLS + 8x8 patches per image
    # layer 1: 8 patches; layer 3: 25% of the 56 left = 14; the CLS token is counted, never removed
    assert [(layer, a // 3, b // 3) for layer, a, b in enc["layers"]] == [(1, 65, 57), (3, 57, 43)]
    assert [(i.sample, i.stock_tokens, i.tokens, i.crops) for i in stats.items] == [(0, 64, 42, 1)] * 2 + [
        (1, 64, 42, 1)
    ]
    # every image is its own span in the LLM: round(0.5 * 42) = 21 each
    assert stats.llm[0].visual_in == [84, 42] and stats.llm[0].visual_out == [42, 21]
    assert stats.visual_tokens() == {"stock": 192, "after_encoder": 126, "after_llm": 63}


@pytest.mark.parametrize(
    "layers, removal, expected",
    [
        ((0,), 1, [63]),
        ((4,), 63, [1]),  # the last layer before the feature layer; one patch left
        ((0, 2, 4), 0.5, [32, 16, 8]),
        ((1, 2, 3, 4), 12, [52, 40, 28, 16]),  # the preset's shape: 12 of 64 = 72 of 576 at 4 layers
        ((2, 3), (0.1, 30), [58, 28]),  # round(6.4) = 6, then 30
    ],
)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_tokens_kept_follow_the_configuration(photos, layers, removal, expected, strategy):
    """Patches left after every merge layer (hand-computed), the CLS token on top of them; the LLM
    gets exactly the survivors (+ the CLS feature with ``full``), the rest are NaN rows."""
    if strategy == "full":
        model, config = full_strategy_model()
    else:
        model, config = FAM.make(), FAM.config
    from illava.tools.inputs import build, word_tokenizer

    inputs = build(config, word_tokenizer(), [IMAGE_Q, IMAGE_Q], [photos["cat"], photos["astronaut"]])
    stock_rows = 64 + (strategy == "full")
    assert (inputs["input_ids"] == 1).sum(1).tolist() == [stock_rows] * 2
    illava.apply(model, IllavaConfig(encoder_layers=layers, encoder_removal=removal, recycle="prune"))
    with torch.inference_mode():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    present = [int((~f.isnan().all(-1)).sum()) for f in features]
    assert [f.shape[0] for f in features] == [stock_rows] * 2
    assert present == [expected[-1] + (strategy == "full")] * 2
    if strategy == "full":
        assert all(not f[0].isnan().any() for f in features)  # the CLS feature: kept, in the first row
    logits(model, inputs)
    stats = illava.stats(model)
    (enc,) = stats.encoder
    counts = [b // 2 - 1 for _, _, b in enc["layers"]]  # patches after every merge layer
    assert counts == expected and [layer for layer, _, _ in enc["layers"]] == list(layers)
    assert [i.tokens for i in stats.items] == [expected[-1] + (strategy == "full")] * 2


def test_cls_is_never_removed_and_survivors_equal_stock(photos):
    """With ``full`` the CLS token's feature is row 0. Pruning 58 of 64 patches at layer 4 (the last
    before the feature layer) with inverted scores (the *least* attended survive): the CLS token
    stays in row 0 with its stock feature, and the 6 survivors equal the stock features of the
    patches they came from (tracked by the recorded trace), in source order, in the last rows."""
    from illava.testing import InvertedScores

    model, config = full_strategy_model()
    from illava.tools.inputs import build, word_tokenizer

    inputs = build(config, word_tokenizer(), [IMAGE_Q], [photos["rocket"]])
    pixels = inputs["pixel_values"]
    with torch.inference_mode():
        (stock,) = model.model.get_image_features(pixels).pooler_output  # (65, D): CLS, 64 patches
    illava.apply(model, IllavaConfig(encoder_layers=(4,), encoder_removal=58, recycle="prune", policy=InvertedScores()))
    from illava.tools.viz import trace

    traced, stats = trace(model, dict(inputs))
    with torch.inference_mode():
        (ours,) = model.model.get_image_features(pixels).pooler_output
    assert ours.shape == stock.shape
    present = ~ours.isnan().all(-1)
    assert present[0] and present.sum() == 1 + 6 and present[-6:].all()
    torch.testing.assert_close(ours[0], stock[0], atol=1e-5, rtol=1e-5)
    unit_trace = traced.units["image"]
    (layer, owner, scores) = unit_trace.layers[0]
    assert layer == 4 and unit_trace.grids == [(SIDE, SIDE)] and owner.numel() == 64  # units: patches only
    kept = (owner == torch.arange(64)).nonzero().flatten()  # survivors represent themselves
    assert kept.numel() == 6
    # inverted scores kept the least attended patches
    assert scores[kept].max() <= scores[owner < 0].min()
    torch.testing.assert_close(ours[-6:], stock[1 + kept], atol=1e-5, rtol=1e-5)
    assert unit_trace.feature[kept].tolist() == list(range(59, 65))
    assert stats.encoder[0]["layers"] == [(4, 65, 7)]


@pytest.mark.parametrize("llm_layers", [(1,), (1, 2), (1, 2, 3)], ids=["1-llm-layer", "2-llm-layers", "3-llm-layers"])
def test_batch_equals_singles_with_several_images_per_sample(photos, llm_layers):
    """Two images in one sample, a text-only sample, one image (left padded in the batch)."""
    model = FAM.make()
    illava.apply(model, FAM.both_stages(llm_layers=llm_layers, keep=0.7))
    prompts = [TWO_Q, TEXT_Q, IMAGE_Q]
    images = [[photos["cat"], photos["rocket"]], [], [photos["coffee"]]]
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


def test_presets_for_published_sizes():
    from transformers import LlavaForConditionalGeneration

    from illava.tools.families.llava import llava_config

    # CLIP-L has 24 layers in both; Vicuna-13B has 40 layers: the LLM layer scales to 11
    for size, llm in (("7b", (9,)), ("13b", (11,))):
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(llava_config(size))
        dims = illava.adapters.adapter_for(model).dimensions(model)
        assert (dims.encoder_depth, dims.tokens_per_crop, dims.feature_layer) == (24, 576, 22)
        cfg = illava.configure(model, "image")
        assert cfg.encoder_layers == (5, 6, 7, 8) and cfg.encoder_removal == 72 and cfg.llm_layers == llm
        assert cfg.llm_keep_ratio == 0.7
        video = illava.configure(model, "video")  # no video in LLaVA-1.5: the image preset
        assert (video.encoder_layers, video.encoder_removal, video.llm_layers) == (
            cfg.encoder_layers,
            72,
            llm,
        )
        assert max(cfg.encoder_layers) < dims.feature_layer


def test_merges_after_the_feature_layer_are_refused():
    """The model reads layer -2: the tiny CLIP has 6 layers, features come out of layer 4."""
    model = FAM.make()
    with pytest.raises(ValueError, match=r"comes after the layer the model reads its visual features from \(4\)"):
        illava.apply(model, IllavaConfig(encoder_layers=(5,), encoder_removal=4))
    illava.apply(model, IllavaConfig(encoder_layers=(4,), encoder_removal=4))


def test_other_vision_towers_refuse_the_encoder_stage(photos):
    from transformers import LlavaForConditionalGeneration

    from illava.tools.families.llava import tiny_llava_config

    config = tiny_llava_config(model_type="siglip_vision_model", vision_use_head=False)
    model = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="needs a CLIP or DINOv2 vision tower; this model's is SiglipVisionModel"):
        illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4))
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))  # the LLM stage still works


def test_a_dinov2_tower_takes_off_the_llm_stage_and_the_encoder_stage(photos):
    """A LLaVA whose vision tower is DINOv2 (``encoder.layer``, not ``encoder.layers``): ``off`` is
    stock, the LLM stage reduces and equals batch vs singles, the encoder stage runs (it used to be
    an AttributeError for every configuration, then a clear error; tests/test_llava_dinov2.py tests
    it against stock)."""
    from transformers import Dinov2Config, LlavaForConditionalGeneration

    config = FAM.config.__class__.from_dict(FAM.config.to_dict())
    config.vision_config = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=8
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    prompts, images = [IMAGE_Q, TEXT_Q, IMAGE_Q], [photos["cat"], photos["rocket"]]
    inputs = FAM.build(prompts, images)
    stock = logits(model, inputs)
    illava.apply(model, "off")
    assert torch.equal(logits(model, inputs), stock)
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))
    batch = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert tokens["after_llm"] < tokens["after_encoder"] == tokens["stock"]
    for i, (prompt, image) in enumerate(zip([IMAGE_Q, IMAGE_Q], images)):
        row = 2 * i
        single = logits(model, FAM.build([prompt], [image]))
        torch.testing.assert_close(batch[row, -single.shape[1] :], single[0], atol=1e-4, rtol=1e-4)
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4))
    assert type(model.model.vision_tower.encoder.layer[1]).__name__ == "IllavaDinov2Layer_Dinov2Layer"
    logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert tokens == {"stock": 128, "after_encoder": 120, "after_llm": 120}  # 4 of 64 patches per image


def test_inputs_have_the_stock_layout(photos):
    from illava.tools.families.llava import llava_config
    from illava.tools.inputs import placeholder_inputs

    inputs = placeholder_inputs(llava_config("7b"), [photos["coffee"].resize((1280, 720))])
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == 32000).sum()) == 576
    with pytest.raises(ValueError, match="takes no video"):
        FAM.build([chat("<video>\nwhat happens?")], (), [[photos["cat"]] * 2])
