"""iLLaVA on tiny random-weight Qwen3-VL (and Qwen3-VL-MoE) against stock transformers.

The tiny config takes deepstack features at vision blocks 0 and 2 and adds them after decoder
layers 0 and 1; merges at blocks 1 and 3 come after the first (and the second) deepstack block, and
an LLM merge at layer 1 comes before the second deepstack addition.
"""

import pytest
import torch
from conftest import chat
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

import illava
from illava import IllavaConfig
from illava.config import removal_units
from illava.tools.families.qwen3_vl import qwen3_vl_config, tiny_qwen3_vl_config
from illava.tools.inputs import build

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
VIDEO_Q = chat("<video>\nwhat happens?")
TEXT_Q = chat("describe a cat in one two three words")
LAYERS = (1, 3)


def half_up(value: float) -> int:
    return int(value + 0.5)


def tiny(moe=False):
    cfg = tiny_qwen3_vl_config(moe=moe)
    cfg.text_config.initializer_range = 0.2
    cfg.vision_config.initializer_range = 0.2
    return cfg


@pytest.fixture(scope="module")
def qconfig():
    return tiny()


def make(config, attn="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    cls = Qwen3VLMoeForConditionalGeneration if config.model_type == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    model = cls(config).eval()
    model.set_attn_implementation(attn)
    return model.to(dtype)


@pytest.fixture
def qbuild(qconfig, tokenizer):
    def qwen_inputs(prompts, images=(), videos=()):
        return build(qconfig, tokenizer, prompts, images, videos)

    return qwen_inputs


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def image_features(model, inputs):
    with torch.inference_mode():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return out.pooler_output[0], [d[0] for d in out.deepstack_features]


def decoder_kwargs(model):
    """Record the decoder's deepstack inputs (a pre-hook registered after illava's sees its work)."""
    seen = {}

    def hook(module, args, kwargs):
        if kwargs.get("visual_pos_masks") is not None:
            seen.update(
                mask=kwargs["visual_pos_masks"].clone(),
                deepstack=[e.clone() for e in kwargs["deepstack_visual_embeds"]],
            )

    model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_off_and_removed_give_stock_logits_and_deepstack(qconfig, qbuild, photos, frames):
    model = make(qconfig)
    inputs = qbuild([IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    ref = logits(model, inputs)
    illava.apply(model, "image", enabled=False)
    assert torch.equal(logits(model, inputs), ref)
    illava.set_enabled(model, True)
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(1,), llm_keep_ratio=0.5))
    reduced = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert reduced.shape == ref.shape and torch.isfinite(reduced).all()
    assert tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"]
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_preset_scales_qwen2_vl_settings_to_the_8b():
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3_vl_config("8b"))
    cfg = illava.configure(model, "image")
    assert cfg.encoder_layers == (10, 11, 12, 13) and cfg.encoder_removal == 0.16
    assert cfg.llm_layers == (8, 9, 10) and cfg.llm_keep_ratio == 0.9
    assert model.config.vision_config.deepstack_visual_indexes == [8, 16, 24]


def test_exact_token_counts_per_stage(qconfig, qbuild, photos, frames):
    model = make(qconfig)
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.25, llm_layers=(2,), llm_keep_ratio=0.5))
    inputs = qbuild([IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    logits(model, inputs)
    stats = illava.stats(model)
    image, video = stats.encoder
    blocks = int(inputs["image_grid_thw"].prod()) // 4
    first = blocks - half_up(0.25 * blocks)
    second = first - half_up(0.25 * first)
    assert image["layers"] == [(1, 4 * blocks, 4 * first), (3, 4 * first, 4 * second)]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame = h * w // 4
    v1 = per_frame - half_up(0.25 * per_frame)
    v2 = v1 - half_up(0.25 * v1)
    assert video["crops"] == t and video["layers"] == [(1, 4 * t * per_frame, 4 * t * v1), (3, 4 * t * v1, 4 * t * v2)]
    assert [(i.kind, i.stock_tokens, i.tokens) for i in stats.items] == [
        ("image", blocks, second),
        ("video", t * per_frame, t * v2),
    ]
    (llm,) = stats.llm
    assert (
        llm.layer == 2
        and llm.visual_in == [second, t * v2]
        and llm.visual_out == [half_up(second / 2), half_up(t * v2 / 2)]
    )


def test_pruned_deepstack_features_are_stock_at_kept_blocks(qconfig, qbuild, photos):
    """Deepstack block 0 comes before the merge at block 1: with pruning, its features of the kept
    blocks are the stock ones, removed blocks are NaN in every deepstack layer as in the main ones."""
    model = make(qconfig)
    inputs = qbuild([IMAGE_Q], [photos["rocket"]])
    stock_main, stock_deep = image_features(model, inputs)
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=0.4, recycle="prune"))
    main, deep = image_features(model, inputs)
    removed = main.isnan().all(-1)
    assert 0 < removed.sum() < removed.numel() and main[removed].isnan().all()
    assert len(deep) == 2 and all(d.shape == s.shape for d, s in zip(deep, stock_deep))
    for d in deep:
        assert torch.equal(d.isnan().all(-1), removed) and not d[~removed].isnan().any()
    torch.testing.assert_close(deep[0][~removed], stock_deep[0][~removed], atol=1e-5, rtol=1e-5)
    # block 2 runs after the merge: its features differ from stock
    assert not torch.allclose(deep[1][~removed], stock_deep[1][~removed], atol=1e-3)


def test_deepstack_features_are_recycled_like_the_main_tokens(qconfig, qbuild, photos):
    """``rank`` at block 1, by hand: the r+1 lowest-scored blocks p0..pr are averaged with weights
    r+1-t into pr; deepstack block 0's feature of pr is its merger applied to the same average of
    the stock block-0 hidden states, every other kept block keeps its stock feature."""
    model = make(qconfig)
    inputs = qbuild([IMAGE_Q], [photos["coffee"]])
    captured = {}
    merger = model.model.visual.deepstack_merger_list[0]
    handle = merger.register_forward_pre_hook(lambda m, a: captured.setdefault("h0", a[0].detach().clone()))
    _, stock_deep = image_features(model, inputs)
    handle.remove()
    removal = 0.3
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=removal, recycle="rank"))
    state = model._illava.state
    with state.recording(), torch.inference_mode():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    deep = out.deepstack_features[0][0]
    (layer, _, scores) = model.model._illava_units(out.illava_call).layers[0]
    assert layer == 1
    n = scores.numel()
    r = removal_units(n, removal, 4)
    low = torch.argsort(scores, stable=True)[: r + 1]
    weights = torch.arange(r + 1, 0, -1, dtype=torch.float32)
    h0 = captured["h0"].view(n, -1)
    average = (h0[low] * weights[:, None]).sum(0) / weights.sum()
    with torch.inference_mode():
        expected_target = merger.stock_forward(average.view(4, -1))[0]
    removed = deep.isnan().all(-1)
    assert removed.sum() == r and removed[low[:r]].all()
    torch.testing.assert_close(deep[low[r]], expected_target, atol=1e-5, rtol=1e-5)
    others = ~removed
    others[low[r]] = False
    torch.testing.assert_close(deep[others], stock_deep[0][others], atol=1e-5, rtol=1e-5)


def test_decoder_gets_the_deepstack_features_of_the_kept_tokens(qconfig, qbuild, photos, frames):
    """Pruned at the last block (after both deepstack blocks), every deepstack row the decoder gets
    is the stock row of a kept visual token, in order, and the visual mask marks exactly those."""
    model = make(qconfig)
    inputs = qbuild([IMAGE_Q, TEXT_Q, VIDEO_Q], [photos["cat"]], [frames])
    stock = decoder_kwargs(model)
    raw = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: raw.update(embeds=kw["inputs_embeds"].clone()), with_kwargs=True
    )
    logits(model, inputs)
    stock = dict(stock)
    illava.apply(model, IllavaConfig(encoder_layers=(3,), encoder_removal=0.4, recycle="prune"))
    ours = decoder_kwargs(model)
    before = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: before.update(embeds=kw["inputs_embeds"].clone()), with_kwargs=True, prepend=True
    )
    logits(model, inputs)
    kept_slots = ~before["embeds"][..., 0].isnan() & stock["mask"]  # stock layout: visual slots kept
    assert kept_slots.sum() < stock["mask"].sum()
    assert int(ours["mask"].sum()) == int(kept_slots.sum())
    rows = kept_slots[stock["mask"]]  # row-major: the stock deepstack rows of kept tokens
    assert len(ours["deepstack"]) == 2
    for got, ref in zip(ours["deepstack"], stock["deepstack"]):
        torch.testing.assert_close(got, ref[rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours["mask"].sum(1), kept_slots.sum(1))


def test_llm_merge_before_a_deepstack_layer_adds_the_kept_tokens_features(qconfig, qbuild, photos):
    """An LLM merge at layer 1 comes before the deepstack addition after layer 1: what is added to
    every kept visual token is its own row (found here by a plain loop over the stock layout)."""
    model = make(qconfig)
    inputs = qbuild([IMAGE_Q, TEXT_Q], [photos["cat"]])
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))
    text = model.model.language_model
    state = model._illava.state
    calls = []
    original = text._deepstack_process

    def spy(hidden, mask, embeds):
        chunk = state.chunk()
        out = original(hidden, mask, embeds)
        calls.append(
            (hidden.clone(), out.clone(), mask.clone(), embeds.clone(), chunk.seq.index.clone(), chunk.seq.mask.clone())
        )
        return out

    text._deepstack_process = spy
    logits(model, inputs)
    assert len(calls) == 2
    hidden, out, mask, embeds, index, valid = calls[1]
    assert hidden.shape[1] < mask.shape[1]  # after the merge at layer 1
    visual_rank = {}
    for b in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[b, j]:
                visual_rank[(b, j)] = len(visual_rank)
    checked = 0
    for b in range(hidden.shape[0]):
        for j in range(hidden.shape[1]):
            origin = int(index[b, j])
            if valid[b, j] and bool(mask[b, origin]):
                torch.testing.assert_close(out[b, j] - hidden[b, j], embeds[visual_rank[(b, origin)]])
                checked += 1
            else:
                assert torch.equal(out[b, j], hidden[b, j])
    assert 0 < checked < len(visual_rank)


def test_generate_and_batch_equals_singles_with_merges_around_deepstack(qconfig, qbuild, photos):
    model = make(qconfig)
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(1, 3), llm_keep_ratio=0.6))
    prompts = [IMAGE_Q, TEXT_Q, chat("<image>\nwhat color?", system="You are a helpful assistant.")]
    images = [photos["cat"], photos["rocket"]]
    with torch.inference_mode():
        batch = model.generate(**qbuild(prompts, images), max_new_tokens=5, do_sample=False, suppress_tokens=[1, 2])
    singles = [qbuild([prompts[0]], [images[0]]), qbuild([prompts[1]]), qbuild([prompts[2]], [images[1]])]
    for i, single in enumerate(singles):
        with torch.inference_mode():
            alone = model.generate(**single, max_new_tokens=5, do_sample=False, suppress_tokens=[1, 2])
        assert torch.equal(alone[0, -5:], batch[i, -5:]), f"sample {i}"


def test_moe_variant_runs_both_stages_and_is_stock_when_removed(tokenizer, photos, frames):
    config = tiny(moe=True)
    model = make(config)
    inputs = build(config, tokenizer, [IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    ref = logits(model, inputs)
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(1,), llm_keep_ratio=0.5))
    out = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"]
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref)


def test_bf16_cluster_is_finite(qconfig, qbuild, photos):
    model = make(qconfig, dtype=torch.bfloat16)
    illava.apply(
        model,
        IllavaConfig(
            encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(1,), llm_keep_ratio=0.5, recycle="cluster"
        ),
    )
    out = logits(model, qbuild([IMAGE_Q], [photos["cat"]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
