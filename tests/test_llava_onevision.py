"""iLLaVA on a tiny random-weight LLaVA-OneVision against stock transformers."""

import math

import pytest
import torch
from conftest import chat

import illava
from illava import IllavaConfig

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
TEXT_Q = chat("describe a cat in one two three words")


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def greedy(model, inputs, n=6, **kw):
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_scores=True, **kw
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, 1)


# ------------------------------------------------------------------------------ stock equivalence
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disabled_and_removed_give_stock_logits(make_model, build, photos, frames, attn):
    model = make_model(attn)
    inputs = build([IMAGE_Q, chat("<video>\nwhat happens?")], [photos["cat"]], [frames])
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
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_keep_everything_in_llm_stage_equals_stock(model, build, photos):
    inputs = build([IMAGE_Q], [photos["astronaut"]])
    ref_seq, ref_scores = greedy(model, inputs)
    illava.apply(model, IllavaConfig(llm_layers=(1, 2), llm_keep_ratio=1.0))
    seq, scores = greedy(model, inputs)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)


def test_text_only_input_is_untouched(model, build):
    inputs = build([TEXT_Q, chat("hello")])
    ref = logits(model, inputs)
    illava.apply(model, "image")
    assert torch.equal(logits(model, inputs), ref)
    assert illava.stats(model).items == []


# ------------------------------------------------------------------------------ token counts
def test_encoder_counts_per_layer_anyres_image(model, build, photos):
    illava.apply(model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=(10, 0.25)))
    logits(model, build([IMAGE_Q], [photos["cat"]]))
    stats = illava.stats(model)
    (enc,) = stats.encoder
    assert enc["kind"] == "image" and enc["crops"] == 7  # base + 2x3 grid for 451x300
    per_crop = [(layer, a // 7, b // 7) for layer, a, b in enc["layers"]]
    assert per_crop == [(1, 64, 54), (3, 54, 40)]  # 0.25 * 54 = 13.5 -> 14 removed
    assert enc["tokens"] == 7 * 64


def test_anyres_layout_counts_match_source_positions(model, build, photos, config):
    """Survivors in the unpadded window plus one newline per unpadded row, plus the base view."""
    from transformers.models.llava_onevision import modeling_llava_onevision as mlo

    illava.apply(model, IllavaConfig(encoder_layers=(2,), encoder_removal=20, recycle="prune"))
    captured = {}
    inner = model.model
    original = type(inner)._pack_survivors

    def spy(self, feature, positions, image_size, newline, aspect, stock):
        captured.update(positions=positions.clone(), image_size=image_size)
        return original(self, feature, positions, image_size, newline, aspect, stock)

    type(inner)._pack_survivors = spy
    inputs = build([IMAGE_Q], [photos["rocket"]])
    logits(model, inputs)
    pos, size = captured["positions"], captured["image_size"]
    side = 8
    gh, gw = mlo.get_anyres_image_grid_shape(size, config.image_grid_pinpoints, 64)
    grid = torch.zeros(gh * side, gw * side)
    for c in range(1, pos.shape[0]):
        for p in pos[c].tolist():
            grid[((c - 1) // gw) * side + p // side, ((c - 1) % gw) * side + p % side] = 1
    window = mlo.unpad_image(grid[None], size)[0]
    expected = 44 + int(window.sum()) + window.shape[0]
    (item,) = illava.stats(model).items
    assert item.tokens == expected
    assert item.stock_tokens == (inputs["input_ids"] == config.image_token_id).sum()


def test_image_preset_counts_and_llm_stage(model, build, photos):
    cfg = illava.apply(model, "image")
    assert cfg.encoder_layers == (1, 2, 3, 4) and cfg.encoder_removal == 8 and cfg.llm_layers == (1,)
    logits(model, build([IMAGE_Q], [photos["astronaut"]]))
    stats = illava.stats(model)
    crops = stats.encoder[0]["crops"]
    per_crop = [(a // crops, b // crops) for _, a, b in stats.encoder[0]["layers"]]
    assert per_crop == [(64, 56), (56, 48), (48, 40), (40, 32)]
    (item,) = stats.items
    (llm,) = stats.llm
    assert llm.layer == 1 and llm.visual_in == [item.tokens]
    assert llm.visual_out == [round(0.7 * item.tokens)]
    assert llm.sequence_in - llm.sequence_out == item.tokens - round(0.7 * item.tokens)


@pytest.mark.parametrize("prompt", ["<image> and <image>: what differs?", "<image><image>what differs?"])
def test_multi_image_sample_single_crops_and_per_image_spans(model, build, photos, prompt):
    """Images placed back to back (as LLaVA-OneVision's chat template writes them) are still two
    spans: the features tell where one image ends."""
    illava.apply(model, IllavaConfig(encoder_layers=(2,), encoder_removal=24, llm_layers=(2,), llm_keep_ratio=0.5))
    inputs = build([chat(prompt)], [photos["cat"], photos["coffee"]])
    logits(model, inputs)
    stats = illava.stats(model)
    assert [(i.crops, i.stock_tokens, i.tokens) for i in stats.items] == [(1, 65, 41), (1, 65, 41)]
    # keep ratio applies per visual span: round(0.5 * 41) = 20 (21 with round-half-up) each
    assert stats.llm[0].visual_out == [2 * math.floor(0.5 * 41 + 0.5)]


def test_video_pooling_of_survivors(model, build, frames):
    illava.apply(model, IllavaConfig(encoder_layers=(1, 2), encoder_removal=14, llm_layers=(2,), llm_keep_ratio=0.7))
    inputs = build([chat("<video>\nwhat happens?")], (), [frames])
    logits(model, inputs)
    stats = illava.stats(model)
    assert stats.encoder[0]["kind"] == "video" and stats.encoder[0]["crops"] == 4
    assert stats.encoder[0]["layers"] == [(1, 4 * 64, 4 * 50), (2, 4 * 50, 4 * 36)]
    (item,) = stats.items
    assert item.stock_tokens == 4 * 16 + 1
    cells = math.ceil(math.sqrt(36) / 2) ** 2  # 9 cells per frame, empty ones give no token
    assert 4 <= item.tokens - 1 <= 4 * cells
    assert stats.llm[0].visual_out == [math.floor(0.7 * item.tokens + 0.5)]


def test_any_removal_count_works(model, build, photos, frames):
    for removal in (1, 7, 13, 50):  # no perfect-square rule
        illava.apply(model, IllavaConfig(encoder_layers=(3,), encoder_removal=removal))
        out = logits(model, build([IMAGE_Q, chat("<video>x")], [photos["cat"]], [frames]))
        assert torch.isfinite(out).all()
        enc = illava.stats(model).encoder[0]
        assert enc["layers"] == [(3, enc["crops"] * 64, enc["crops"] * (64 - removal))]


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("recycle", ["rank", "cluster", "prune"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_is_repeatable(make_model, build, photos, recycle, attn):
    model = make_model(attn)
    illava.apply(model, "image", recycle=recycle)
    inputs = build([IMAGE_Q], [photos["cat"]])
    seq1, scores1 = greedy(model, inputs, n=24)
    seq2, scores2 = greedy(model, inputs, n=24)
    assert seq1.shape == (1, 24) and torch.equal(seq1, seq2)
    torch.testing.assert_close(scores1, scores2)
    torch.manual_seed(3)
    with torch.inference_mode():
        sampled = model.generate(**inputs, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0)
    assert sampled.shape[1] == inputs["input_ids"].shape[1] + 24


def test_kv_cache_lengths_per_layer(model, build, photos):
    illava.apply(model, "image")
    inputs = build([IMAGE_Q], [photos["astronaut"]])
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
    stats = illava.stats(model)
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert lengths[0] == stats.sequence_after_encoder == stats.llm[0].sequence_in
    assert lengths[1:] == [stats.llm[0].sequence_out] * 3


def test_encoder_stage_decoding_matches_recomputation(model, build, photos):
    """With the encoder stage only, each cached decoding step must equal a full recomputation."""
    illava.apply(model, "encoder-only")
    inputs = build([IMAGE_Q], [photos["cat"]])
    seq, scores = greedy(model, inputs, n=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for step in range(5):
        full = dict(
            inputs,
            input_ids=torch.cat([ids, seq[:, :step]], 1),
            attention_mask=torch.cat([mask, torch.ones_like(seq[:, :step])], 1),
        )
        ref = logits(model, full, use_cache=False)[:, -1]
        torch.testing.assert_close(scores[:, step], ref, atol=1e-4, rtol=1e-4)


def test_batch_equals_singles_mixed_samples(model, build, photos):
    illava.apply(model, "image")
    prompts = [IMAGE_Q, TEXT_Q, chat("<image>\nwhat color?", system="You are a helpful assistant.")]
    images = [photos["cat"], photos["rocket"]]
    batch_seq, batch_scores = greedy(model, build(prompts, images), n=8)
    singles = [build([prompts[0]], [images[0]]), build([prompts[1]]), build([prompts[2]], [images[1]])]
    for i, single in enumerate(singles):
        seq, scores = greedy(model, single, n=8)
        assert torch.equal(seq[0], batch_seq[i]), f"sample {i}"
        torch.testing.assert_close(scores[0], batch_scores[i], atol=2e-4, rtol=2e-4)


def test_visual_spans_come_from_placeholders_not_offsets(model, build, photos):
    """Any system prompt: the same image gets the same reduction wherever its span starts."""
    illava.apply(model, "image")
    counts = []
    for system in (None, "short", "a much longer system prompt with many words in front of the image"):
        logits(model, build([chat("<image>\nwhat is this?", system=system)], [photos["coffee"]]))
        s = illava.stats(model)
        counts.append((s.items[0].tokens, s.llm[0].visual_out[0]))
    assert len(set(counts)) == 1


def test_dtype_is_preserved(make_model, build, photos):
    model = make_model(dtype=torch.bfloat16)
    illava.apply(model, "image", recycle="cluster")
    inputs = build([IMAGE_Q], [photos["cat"]])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    seen = set()
    hooks = [
        m.register_forward_hook(lambda mod, a, out: seen.add(out.dtype)) for m in model.model.language_model.layers
    ]
    hooks += [
        m.register_forward_hook(lambda mod, a, out: seen.add(out.dtype))
        for m in model.model.vision_tower.encoder.layers
    ]
    out = logits(model, inputs)
    assert out.dtype == torch.bfloat16 and seen == {torch.bfloat16}


# ------------------------------------------------------------------------------ errors
def test_prompt_ending_with_an_image_keeps_a_last_token(model, build, photos):
    """Survivors fill an image's last slots, so a prompt that ends with an image still has its last
    position, and the next-token logits, from a real token."""
    illava.apply(model, "image")
    inputs = build(["<image>"], [photos["cat"]])
    out = logits(model, inputs)
    assert torch.isfinite(out).all()
    assert illava.stats(model).items[0].tokens < illava.stats(model).items[0].stock_tokens


# ------------------------------------------------------------------------------ accelerate
def manual_greedy(model, inputs, n):
    """Greedy decoding by hand: forward with the cache, the growing full-length 2D mask and
    positions, as generate() does, but through the plain forward (works with offloading)."""
    cache, mask = None, inputs["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    step_inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    tokens, last = [], []
    with torch.inference_mode():
        for _ in range(n):
            out = model(**step_inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache = out.cache
            last.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            positions = positions[:, -1:] + 1
            step_inputs = {"input_ids": nxt}
    return torch.cat(tokens, 1), torch.stack(last, 1)


def test_manual_decoding_matches_generate(model, build, photos):
    illava.apply(model, "image")
    inputs = build([IMAGE_Q, TEXT_Q], [photos["coffee"]])
    seq, scores = greedy(model, inputs, n=6)
    man_seq, man_scores = manual_greedy(model, inputs, 6)
    assert torch.equal(seq, man_seq)
    torch.testing.assert_close(scores, man_scores)


def _layerwise_device_map(config):
    names = [f"model.vision_tower.encoder.layers.{i}" for i in range(config.vision_config.num_hidden_layers)]
    names += [f"model.language_model.layers.{i}" for i in range(config.text_config.num_hidden_layers)]
    names += [
        "model.vision_tower.embeddings",
        "model.vision_tower.post_layernorm",
        "model.multi_modal_projector",
        "model.language_model.embed_tokens",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "model.image_newline",
        "lm_head",
    ]
    return dict.fromkeys(names, "cpu")


def test_dispatched_model_keeps_working(model, build, photos, config):
    accelerate = pytest.importorskip("accelerate")
    inputs = build([IMAGE_Q], [photos["cat"]])
    illava.apply(model, "image")
    ref_seq, ref_scores = greedy(model, inputs)
    illava.remove(model)
    model = accelerate.dispatch_model(model, device_map=_layerwise_device_map(config), force_hooks=True)
    illava.apply(model, "image")  # after dispatch: the patched classes must still run
    assert all(hasattr(model.model.vision_tower.encoder.layers[i], "_old_forward") for i in (1, 2, 3, 4))
    seq, scores = greedy(model, inputs)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores)
    enc = illava.stats(model).encoder[0]
    assert enc["layers"][-1] == (4, enc["crops"] * 40, enc["crops"] * 32)


def test_offloaded_model_keeps_working(model, build, photos):
    """cpu_offload keeps weights on 'meta' until each module runs (stock generate() cannot run
    such a model: it calls get_image_features outside forward), so decode by hand."""
    accelerate = pytest.importorskip("accelerate")
    inputs = build([IMAGE_Q], [photos["cat"]])
    illava.apply(model, "image")
    ref_seq, ref_scores = manual_greedy(model, inputs, 4)
    illava.remove(model)
    model = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    illava.apply(model, "image")
    seq, scores = manual_greedy(model, inputs, 4)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores)
