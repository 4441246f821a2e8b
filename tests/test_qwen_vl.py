"""iLLaVA on tiny random-weight Qwen2-VL and Qwen2.5-VL against stock transformers."""

import pytest
import torch
from conftest import chat
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import illava
from illava import IllavaConfig
from illava.tools.architectures import tiny_config
from illava.tools.inputs import build

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
VIDEO_Q = chat("<video>\nwhat happens?")
TEXT_Q = chat("describe a cat in one two three words")
CLASSES = {"2": Qwen2VLForConditionalGeneration, "2.5": Qwen2_5_VLForConditionalGeneration}
# merge layers valid for both (Qwen2.5-VL's tiny config has full attention at blocks 1 and 3)
LAYERS = (1, 3)


def half_up(value: float) -> int:
    return int(value + 0.5)


@pytest.fixture(params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def version(request):
    return request.param


@pytest.fixture
def qconfig(version):
    cfg = tiny_config("tiny-qwen2-vl" if version == "2" else "tiny-qwen2.5-vl")
    cfg.text_config.initializer_range = 0.2
    cfg.vision_config.initializer_range = 0.2
    return cfg


@pytest.fixture
def make_qwen(qconfig, version):
    def make(attn="sdpa", dtype=torch.float32):
        torch.manual_seed(0)
        model = CLASSES[version](qconfig).eval()
        model.set_attn_implementation(attn)
        return model.to(dtype)

    return make


@pytest.fixture
def qbuild(qconfig, tokenizer):
    def qwen_inputs(prompts, images=(), videos=()):
        return build(qconfig, tokenizer, prompts, images, videos)

    return qwen_inputs


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def greedy(model, inputs, n=6):
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_scores=True
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disabled_and_removed_give_stock_logits(make_qwen, qbuild, photos, frames, attn):
    model = make_qwen(attn)
    inputs = qbuild([IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    ref = logits(model, inputs)
    illava.apply(model, "image", enabled=False)
    assert torch.equal(logits(model, inputs), ref)
    illava.set_enabled(model, True)
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(2,), llm_keep_ratio=0.5))
    reduced = logits(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert reduced.shape == ref.shape and tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"]
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_presets_follow_the_authors_settings(make_qwen, version):
    from illava.tools.families.qwen_vl import qwen2_5_vl_config, qwen2_vl_config

    cls = CLASSES[version]
    for size, llm in (("7b", (6, 7, 8)), ("2b" if version == "2" else "3b", ())):
        config = qwen2_vl_config(size) if version == "2" else qwen2_5_vl_config(size)
        with torch.device("meta"):
            model = cls(config)
        cfg = illava.configure(model, "image")
        if version == "2":
            assert cfg.encoder_layers == (12, 13, 14, 15) and cfg.encoder_removal == 0.16
            assert cfg.llm_layers == llm
        else:
            assert cfg.encoder_layers == (7, 15) and cfg.llm_layers in ((6, 7, 8), (8, 9, 10))


def test_blocks_are_removed_whole_per_frame(make_qwen, qbuild, photos, frames):
    model = make_qwen()
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.25))
    inputs = qbuild([IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    logits(model, inputs)
    stats = illava.stats(model)
    image, video = stats.encoder
    blocks = int(inputs["image_grid_thw"].prod()) // 4  # 1 frame
    after_first = blocks - half_up(0.25 * blocks)
    after_second = after_first - half_up(0.25 * after_first)
    assert image["layers"] == [(1, 4 * blocks, 4 * after_first), (3, 4 * after_first, 4 * after_second)]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame = h * w // 4
    first = per_frame - half_up(0.25 * per_frame)
    assert video["crops"] == t and video["layers"][0] == (1, 4 * t * per_frame, 4 * t * first)
    assert [(i.kind, i.stock_tokens, i.tokens) for i in stats.items] == [
        ("image", blocks, after_second),
        ("video", t * per_frame, t * (first - half_up(0.25 * first))),
    ]


def test_pruned_survivors_equal_stock_features_at_their_slots(make_qwen, qbuild, photos, qconfig):
    """Pruning at the last block changes nothing for survivors: the merged features of the kept
    2x2 blocks must equal stock ones at the same LLM slots (checks block order, windows, scatter)."""
    model = make_qwen()
    inputs = qbuild([IMAGE_Q], [photos["rocket"]])
    with torch.inference_mode():
        stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    last = qconfig.vision_config.depth - 1
    illava.apply(model, IllavaConfig(encoder_layers=(last,), encoder_removal=0.4, recycle="prune"))
    with torch.inference_mode():
        ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    assert ours.shape == stock.shape  # the stock count: removed blocks are NaN rows
    valid = ~ours.isnan().all(-1)
    assert 0 < valid.sum() < valid.numel() and ours[~valid].isnan().all()
    torch.testing.assert_close(ours[valid], stock[valid], atol=1e-5, rtol=1e-5)


def test_mrope_positions_of_survivors_are_gathered(make_qwen, qbuild, photos):
    """The decoder input keeps the survivors' own (t, h, w) positions, not renumbered ones."""
    model = make_qwen()
    inputs = qbuild([IMAGE_Q, TEXT_Q], [photos["coffee"]])
    seen = {}

    def raw(module, args, kwargs):  # registered first: sees the decoder input as stock builds it
        seen.update(pos=kwargs["position_ids"].clone(), embeds=kwargs["inputs_embeds"].clone())

    model.model.language_model.register_forward_pre_hook(raw, with_kwargs=True)
    logits(model, inputs)
    stock_positions = seen["pos"][-3:]
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3))
    captured = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: captured.update(pos=kw["position_ids"].clone(), mask=kw["attention_mask"].clone()),
        with_kwargs=True,
    )
    logits(model, inputs)
    keep = inputs["attention_mask"].bool() & ~seen["embeds"][..., 0].isnan()  # NaN rows: removed blocks
    assert (~keep & inputs["attention_mask"].bool()).any()
    for row in range(2):
        got = captured["pos"][-3:, row][:, captured["mask"][row].bool()]
        torch.testing.assert_close(got, stock_positions[:, row][:, keep[row]])
    assert captured["pos"].shape[-1] < stock_positions.shape[-1]


def test_keep_everything_in_llm_stage_equals_stock(make_qwen, qbuild, photos):
    model = make_qwen()
    inputs = qbuild([IMAGE_Q], [photos["astronaut"]])
    ref_seq, ref_scores = greedy(model, inputs)
    illava.apply(model, IllavaConfig(llm_layers=(1, 2), llm_keep_ratio=1.0))
    seq, scores = greedy(model, inputs)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recycle", ["rank", "cluster", "prune"])
def test_generate_repeatable_with_both_stages(make_qwen, qbuild, photos, frames, recycle):
    model = make_qwen()
    illava.apply(
        model,
        IllavaConfig(
            encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(1, 2), llm_keep_ratio=0.7, recycle=recycle
        ),
    )
    inputs = qbuild([IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    seq1, scores1 = greedy(model, inputs, n=16)
    seq2, scores2 = greedy(model, inputs, n=16)
    assert torch.equal(seq1, seq2)
    torch.testing.assert_close(scores1, scores2)
    assert len(illava.stats(model).llm) == 2


def test_batch_equals_singles_mixed_samples(make_qwen, qbuild, photos, frames):
    model = make_qwen()
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(2,), llm_keep_ratio=0.6))
    prompts = [IMAGE_Q, TEXT_Q, chat("<image>\nwhat color?", system="You are a helpful assistant.")]
    images = [photos["cat"], photos["rocket"]]
    batch_seq, batch_scores = greedy(model, qbuild(prompts, images), n=8)
    singles = [qbuild([prompts[0]], [images[0]]), qbuild([prompts[1]]), qbuild([prompts[2]], [images[1]])]
    for i, single in enumerate(singles):
        seq, scores = greedy(model, single, n=8)
        assert torch.equal(seq[0], batch_seq[i]), f"sample {i}"
        torch.testing.assert_close(scores[0], batch_scores[i], atol=2e-4, rtol=2e-4)


def test_text_only_is_untouched(make_qwen, qbuild):
    model = make_qwen()
    inputs = qbuild([TEXT_Q, chat("hello")])
    ref = logits(model, inputs)
    illava.apply(model, IllavaConfig(encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(2,), llm_keep_ratio=0.5))
    assert torch.equal(logits(model, inputs), ref)


def test_bf16_is_preserved(make_qwen, qbuild, photos):
    model = make_qwen(dtype=torch.bfloat16)
    illava.apply(
        model,
        IllavaConfig(
            encoder_layers=LAYERS, encoder_removal=0.3, llm_layers=(2,), llm_keep_ratio=0.5, recycle="cluster"
        ),
    )
    out = logits(model, qbuild([IMAGE_Q], [photos["cat"]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_qwen25_window_blocks_are_rejected():
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config("tiny-qwen2.5-vl"))
    with pytest.raises(ValueError, match=r"full-attention blocks \[1, 3\]"):
        illava.apply(model, IllavaConfig(encoder_layers=(2,), encoder_removal=0.2))
