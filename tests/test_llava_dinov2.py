"""iLLaVA on a tiny random-weight LLaVA whose vision tower is DINOv2 (``Dinov2Model``, and
``Dinov2WithRegistersModel`` with 2 register tokens) against stock transformers: the encoder stage
runs ``IllavaDinov2Layer`` (layer scales as stock), the CLS and register tokens are never removed,
and with the ``default`` strategy the registers stay features before the patches, as stock reads
them."""

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava import IllavaConfig
from illava.tools.inputs import build, word_tokenizer

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
TWO_Q = chat("<image>\n<image>\ncompare the two")
TEXT_Q = chat("describe a cat in one two three words")
FAM = next(f for f in FAMILIES if f.name == "llava")
PATCHES = 64  # 64 px images, 8 px patches -> 8x8 patches (+ CLS and registers in the encoder)
REGISTERS = [0, 2]


def dinov2_model(registers: int = 0, attn: str = "sdpa", strategy: str = "default", seed: int = 0):
    """The tiny LLaVA with a 6-layer DINOv2 tower read at layer -2 (merges allowed at layers 0-4,
    ``tiny_llava_dinov2_config``); the layer scales are random (not the constant
    ``layerscale_value``), so that a merge layer that drops or misplaces one differs from stock."""
    from transformers import LlavaForConditionalGeneration

    from illava.tools.families.llava import tiny_llava_dinov2_config

    config = tiny_llava_dinov2_config(registers=registers)
    config.text_config.initializer_range = config.vision_config.initializer_range = 0.2
    config.vision_feature_select_strategy = strategy
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            layer.layer_scale1.lambda1.normal_(0.5, 0.5)
            layer.layer_scale2.lambda1.normal_(0.5, 0.5)
    model.set_attn_implementation(attn)
    return model, config


def make_inputs(config, prompts, images=()):
    return build(config, word_tokenizer(), prompts, images)


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def greedy(model, inputs, n=5):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=[1, 2])


def features(model, pixels):
    with torch.inference_mode():
        return model.model.get_image_features(pixels).pooler_output


@pytest.mark.parametrize("registers", REGISTERS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_merge_layers_removing_nothing_equal_stock(photos, registers, attn, strategy):
    """Merge layers at every layer up to the feature layer, removing nothing: they run (the encoder
    statistics list them) and the features and logits are stock's to float tolerance."""
    model, config = dinov2_model(registers, attn, strategy)
    inputs = make_inputs(config, [IMAGE_Q, TEXT_Q], [photos["cat"]])
    stock_features, stock = features(model, inputs["pixel_values"]), logits(model, inputs)
    illava.apply(model, IllavaConfig(encoder_layers=(0, 1, 2, 3, 4), encoder_removal=0))
    layers = model.model.vision_tower.encoder.layer
    assert all(type(layers[i]).__name__.startswith("IllavaDinov2Layer") for i in range(5))
    ours = features(model, inputs["pixel_values"])
    assert len(ours) == len(stock_features) == 1 and ours[0].shape == stock_features[0].shape
    torch.testing.assert_close(ours[0], stock_features[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, inputs), stock, atol=1e-4, rtol=1e-4)  # explicit softmax vs sdpa
    (enc,) = illava.stats(model).encoder
    tokens = 1 + registers + PATCHES
    assert enc["tokens"] == tokens and enc["layers"] == [(i, tokens, tokens) for i in range(5)]


@pytest.mark.parametrize("registers", REGISTERS)
def test_off_removed_and_disabled_give_stock_logits_and_generation(photos, registers):
    model, config = dinov2_model(registers)
    inputs = make_inputs(config, [IMAGE_Q, TEXT_Q], [photos["cat"]])
    ref, ref_gen = logits(model, inputs), greedy(model, inputs)
    illava.apply(model, "off")
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    both = IllavaConfig(encoder_layers=(1, 3), encoder_removal=8, llm_layers=(1, 2), llm_keep_ratio=0.6)
    illava.apply(model, both, enabled=False)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.set_enabled(model, True)
    reduced = logits(model, inputs)
    assert reduced.shape == ref.shape and not reduced.isnan().any()
    tokens = illava.stats(model).visual_tokens()
    assert tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"] == PATCHES + registers
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    assert not any("Illava" in type(m).__name__ for m in model.modules())


@pytest.mark.parametrize("registers", REGISTERS)
def test_exact_counts_per_stage_two_images(photos, registers):
    """Layer 1 removes 8 patches, layer 3 25% of the 56 left (14); CLS and registers are counted in
    the encoder and never removed; the registers are features (``default`` drops the CLS only)."""
    model, config = dinov2_model(registers)
    illava.apply(
        model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=(8, 0.25), llm_layers=(2,), llm_keep_ratio=0.5)
    )
    inputs = make_inputs(config, [TWO_Q, IMAGE_Q], [photos["cat"], photos["rocket"], photos["coffee"]])
    stock_rows = PATCHES + registers
    assert (inputs["input_ids"] == 1).sum(1).tolist() == [2 * stock_rows, stock_rows]
    out = logits(model, inputs)
    assert not out.isnan().any()
    stats = illava.stats(model)
    (enc,) = stats.encoder
    head = 1 + registers
    assert enc["crops"] == 3 and enc["tokens"] == 3 * (head + PATCHES)
    assert [(layer, a // 3, b // 3) for layer, a, b in enc["layers"]] == [
        (1, head + 64, head + 56),
        (3, head + 56, head + 42),
    ]
    kept = 42 + registers  # the patches left and the registers
    assert [(i.sample, i.stock_tokens, i.tokens) for i in stats.items] == [
        (0, stock_rows, kept),
        (0, stock_rows, kept),
        (1, stock_rows, kept),
    ]
    half = round(0.5 * kept)
    assert stats.llm[0].visual_in == [2 * kept, kept] and stats.llm[0].visual_out == [2 * half, half]
    assert stats.visual_tokens() == {"stock": 3 * stock_rows, "after_encoder": 3 * kept, "after_llm": 3 * half}


@pytest.mark.parametrize("registers", REGISTERS)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_cls_and_registers_are_never_removed_and_keep_their_stock_features(photos, registers, strategy):
    """58 of 64 patches pruned at layer 4 (the last before the feature layer): the feature rows
    before the patches (registers, and the CLS with ``full``) are stock's, 6 patch survivors fill the
    last rows, every other row is NaN."""
    model, config = dinov2_model(registers, strategy=strategy)
    inputs = make_inputs(config, [IMAGE_Q], [photos["rocket"]])
    (stock,) = features(model, inputs["pixel_values"])
    head = registers + (strategy == "full")
    assert stock.shape[0] == head + PATCHES and int((inputs["input_ids"] == 1).sum()) == head + PATCHES
    illava.apply(model, IllavaConfig(encoder_layers=(4,), encoder_removal=58, recycle="prune"))
    (ours,) = features(model, inputs["pixel_values"])
    present = ~ours.isnan().all(-1)
    assert ours.shape == stock.shape and int(present.sum()) == head + 6
    assert present[:head].all() and present[-6:].all()
    torch.testing.assert_close(ours[:head], stock[:head], atol=1e-5, rtol=1e-5)
    assert not logits(model, inputs).isnan().any()
    assert illava.stats(model).encoder[0]["layers"] == [(4, 1 + registers + 64, 1 + registers + 6)]


@pytest.mark.parametrize("registers", REGISTERS)
@pytest.mark.parametrize("llm_layers", [(1,), (1, 2), (1, 2, 3)], ids=["1-llm-layer", "2-llm-layers", "3-llm-layers"])
def test_batch_equals_singles_with_several_images_per_sample(photos, registers, llm_layers):
    """Two images in one sample, a text-only sample, one image (left padded in the batch), with the
    encoder stage and 1, 2 or 3 LLM merge layers."""
    model, config = dinov2_model(registers)
    illava.apply(
        model,
        IllavaConfig(encoder_layers=(1, 3), encoder_removal=0.3, llm_layers=llm_layers, llm_keep_ratio=0.7),
    )
    prompts = [TWO_Q, TEXT_Q, IMAGE_Q]
    images = [[photos["cat"], photos["rocket"]], [], [photos["coffee"]]]
    batch = make_inputs(config, prompts, [im for group in images for im in group])
    assert (batch["attention_mask"] == 0).any()
    out = logits(model, batch)[:, -1]
    after = illava.stats(model).visual_tokens()
    assert after["after_llm"] < after["after_encoder"] < after["stock"] == 3 * (PATCHES + registers)
    total = 0
    for i, (prompt, group) in enumerate(zip(prompts, images)):
        alone = logits(model, make_inputs(config, [prompt], group))[:, -1]
        torch.testing.assert_close(alone[0], out[i], atol=2e-4, rtol=2e-4, msg=f"sample {i}")
        if group:  # (a text-only forward publishes no visual statistics)
            total += illava.stats(model).visual_tokens()["after_llm"]
    assert total == after["after_llm"]


@pytest.mark.parametrize("registers", REGISTERS)
def test_generation_with_both_stages_equals_singles(photos, registers):
    """Greedy generation of a mixed batch (image, text-only) equals each sample's own."""
    model, config = dinov2_model(registers)
    illava.apply(model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=8, llm_layers=(1,), llm_keep_ratio=0.5))
    prompts, images = [IMAGE_Q, TEXT_Q], [[photos["cat"]], []]
    batch = greedy(model, make_inputs(config, prompts, [photos["cat"]]))
    for i, (prompt, group) in enumerate(zip(prompts, images)):
        alone = greedy(model, make_inputs(config, [prompt], group))
        assert batch[i, -5:].tolist() == alone[0, -5:].tolist()


def test_merges_after_the_feature_layer_are_refused():
    """The model reads layer -2 of the 6-layer DINOv2: features come out of layer 4."""
    model, _ = dinov2_model()
    with pytest.raises(ValueError, match=r"comes after the layer the model reads its visual features from \(4\)"):
        illava.apply(model, IllavaConfig(encoder_layers=(5,), encoder_removal=4))
    illava.apply(model, IllavaConfig(encoder_layers=(4,), encoder_removal=4))


def test_the_adapter_fits_the_tower():
    """``adapter_for`` gives a DINOv2 tower's own adapter (its layer mixin, CLS + registers kept);
    the shared adapter (CLIP) is left as it is."""
    from illava.adapters import adapter_for
    from illava.hf.encoder import IllavaDinov2Layer, IllavaViTLayer

    clip = adapter_for(FAM.make())
    assert (clip.layer_mixin, clip.keep_first) == (IllavaViTLayer, 1)
    for registers in REGISTERS:
        adapter = adapter_for(dinov2_model(registers)[0])
        assert (adapter.layer_mixin, adapter.keep_first) == (IllavaDinov2Layer, 1 + registers)
    assert (adapter_for(FAM.make()).layer_mixin, adapter_for(FAM.make()).keep_first) == (IllavaViTLayer, 1)


@pytest.mark.parametrize("registers", REGISTERS)
def test_images_of_another_size_than_the_towers(photos, registers):
    """DINOv2 interpolates its positions: 96 px images (12x12 patches) through a tower configured
    for 64 px. Removing nothing is stock; 20 patches at layer 1 leave 124 of 144 with the CLS and
    registers on top, and the batch equals the singles."""
    model, config = dinov2_model(registers)
    larger = config.__class__.from_dict(config.to_dict())
    larger.vision_config.image_size = 96  # the inputs' size (placeholders and processor), not the model's
    inputs = make_inputs(larger, [IMAGE_Q, TEXT_Q, IMAGE_Q], [photos["cat"], photos["rocket"]])
    assert inputs["pixel_values"].shape[-2:] == (96, 96)
    assert (inputs["input_ids"] == 1).sum(1).tolist() == [144 + registers, 0, 144 + registers]
    stock = logits(model, inputs)
    illava.apply(model, IllavaConfig(encoder_layers=(0, 2), encoder_removal=0))
    torch.testing.assert_close(logits(model, inputs), stock, atol=1e-4, rtol=1e-4)
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=20, llm_layers=(1,), llm_keep_ratio=0.5))
    batch = logits(model, inputs)[:, -1]
    stats = illava.stats(model)
    head = 1 + registers
    assert stats.encoder[0]["layers"] == [(1, 2 * (head + 144), 2 * (head + 124))]
    assert stats.visual_tokens() == {
        "stock": 2 * (144 + registers),
        "after_encoder": 2 * (124 + registers),
        "after_llm": 2 * round(0.5 * (124 + registers)),
    }
    for i, image in ((0, photos["cat"]), (2, photos["rocket"])):
        alone = logits(model, make_inputs(larger, [IMAGE_Q], [image]))[:, -1]
        torch.testing.assert_close(alone[0], batch[i], atol=2e-4, rtol=2e-4, msg=f"sample {i}")
