"""iLLaVA on a tiny random-weight Gemma 3 (SigLIP 16x16 patches pooled 4x4 to 16 tokens; decoder
layers sliding, global, sliding, global with a window of 8) against stock transformers and
hand-built references (the shared behaviour, every generate mode, viz, runs in the
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
FAM = next(f for f in FAMILIES if f.name == "gemma3")
SIDE, BLOCKS = 16, 4  # tiny config: 64 px, 4 px patches -> 16x16 patches, 4x4 blocks of 4x4 patches
WINDOW = 8


def make(seed=0, config=None):
    """The tiny Gemma 3 with a random projector (stock initialises it to zero, which would make
    every image token the same)."""
    if config is None:
        model = FAM.make(seed=seed)
    else:
        from transformers import Gemma3ForConditionalGeneration

        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed + 1)
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.3)
    return model


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def greedy(model, inputs, n=5):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=[1, 2])


def test_block_order_lists_every_block_in_raster_order():
    from illava.plan.encoder import block_order

    order = block_order(8, 4)
    assert sorted(order.tolist()) == list(range(64))
    assert order[:16].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    assert order[16:20].tolist() == [4, 5, 6, 7]  # block (0, 1)
    assert order[32:36].tolist() == [32, 33, 34, 35]  # block (1, 0)


def test_off_removed_and_disabled_give_stock_logits_and_generation(photos):
    model = make()
    inputs = FAM.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    assert inputs["token_type_ids"].sum(1).tolist() == [16, 0]
    ref, ref_gen = logits(model, inputs), greedy(model, inputs)
    illava.apply(model, "off")
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.apply(model, FAM.both_stages(llm_layers=(1, 2)), enabled=False)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    illava.set_enabled(model, True)
    reduced = logits(model, inputs)
    gen = greedy(model, inputs)
    tokens = illava.stats(model).visual_tokens()
    assert reduced.shape == ref.shape and torch.isfinite(reduced).all() and gen.shape == ref_gen.shape
    assert tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"] == 16
    illava.remove(model)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(greedy(model, inputs), ref_gen)
    assert not any("Illava" in type(m).__name__ for m in model.modules())
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert not any(isinstance(h, Hook) for h in hooks)


def test_exact_counts_per_stage_two_images(photos):
    model = make()
    illava.apply(
        model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=(32, 0.5), llm_layers=(2,), llm_keep_ratio=0.6)
    )
    inputs = FAM.build([TWO_Q, IMAGE_Q], [photos["cat"], photos["rocket"], photos["coffee"]])
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)
    assert (inputs["input_ids"] == 1).sum(1).tolist() == [32, 16]  # 16 image tokens per image
    # boi + 16 image tokens + eoi per image
    assert ((inputs["input_ids"] == 6).sum(1) == (inputs["input_ids"] == 7).sum(1)).all()
    logits(model, inputs)
    stats = illava.stats(model)
    (enc,) = stats.encoder
    assert enc["crops"] == 3 and enc["tokens"] == 3 * 256
    # layer 1: 32 patches = 2 blocks (16 -> 14 blocks); layer 3: half of the 14 blocks (-> 7 blocks)
    assert [(layer, a // 3, b // 3) for layer, a, b in enc["layers"]] == [(1, 256, 224), (3, 224, 112)]
    assert [(i.sample, i.stock_tokens, i.tokens, i.crops) for i in stats.items] == [(0, 16, 7, 1)] * 2 + [(1, 16, 7, 1)]
    # every image is its own span in the LLM: round(0.6 * 7) = 4 each
    assert stats.llm[0].visual_in == [14, 7] and stats.llm[0].visual_out == [8, 4]
    assert stats.visual_tokens() == {"stock": 48, "after_encoder": 21, "after_llm": 12}


def test_pooling_after_the_encoder_stage_averages_real_neighbourhoods(photos):
    """Pruning 11 of the 16 blocks at the last SigLIP layer (after its attention, before its MLP):
    every surviving block's 16 tokens are the stock tokens of its 4x4 neighbourhood, so its row is
    the stock pooled feature, which is computed here by hand from the stock encoder output (the mean
    of the 4x4 patches, normalised, projected); removed blocks' rows are NaN."""
    model = make()
    inputs = FAM.build([IMAGE_Q], [photos["rocket"]])
    pixels = inputs["pixel_values"]
    proj = model.model.multi_modal_projector
    with torch.inference_mode():
        stock = model.model.get_image_features(pixels).pooler_output[0]  # (16, D)
        grid = model.model.vision_tower(pixel_values=pixels).last_hidden_state[0].view(SIDE, SIDE, -1)
        by_hand = torch.stack(
            [grid[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(16, -1).mean(0) for r in range(4) for c in range(4)]
        )
        by_hand = proj.mm_soft_emb_norm(by_hand) @ proj.mm_input_projection_weight
    torch.testing.assert_close(stock, by_hand, atol=1e-5, rtol=1e-5)
    illava.apply(model, IllavaConfig(encoder_layers=(3,), encoder_removal=11 * 16, recycle="prune"))
    from illava.tools.viz import trace

    traced, stats = trace(model, dict(inputs))
    with torch.inference_mode():
        (ours,) = model.model.get_image_features(pixels).pooler_output
    assert ours.shape == stock.shape
    present = ~ours.isnan().all(-1)
    assert int(present.sum()) == 5 and stats.encoder[0]["layers"] == [(3, 256, 80)]
    unit_trace = traced.units["image"]
    (layer, owner, _) = unit_trace.layers[0]
    kept = (owner == torch.arange(16)).nonzero().flatten()
    assert (
        layer == 3 and unit_trace.grids == [(BLOCKS, BLOCKS)] and kept.tolist() == present.nonzero().flatten().tolist()
    )
    assert unit_trace.feature[kept].tolist() == kept.tolist() and (unit_trace.feature[owner < 0] == -1).all()
    torch.testing.assert_close(ours[present], by_hand[present], atol=1e-5, rtol=1e-5)


def test_encoder_stage_equals_stock_with_the_survivors_in_a_shorter_prompt(photos):
    """With a window longer than the prompt, the encoder stage is stock Gemma 3 run on a prompt
    holding only the surviving image tokens (positions renumbered), each image's survivors still
    one bidirectional block (given by ``token_type_ids``)."""
    from illava.tools.families.gemma3 import tiny_gemma3_config

    model = make(config=tiny_gemma3_config(sliding_window=4096))
    model.set_attn_implementation("sdpa")
    inputs = FAM.build([TWO_Q], [photos["cat"], photos["coffee"]])
    illava.apply(model, IllavaConfig(encoder_layers=(1, 2), encoder_removal=0.4))
    ours = logits(model, inputs)[0]
    with torch.inference_mode():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
    illava.remove(model)
    ids = inputs["input_ids"][0]
    embeds = model.model.get_input_embeddings()(ids)
    embeds[ids == 1] = features
    keep = ~embeds.isnan().any(-1)
    assert int(keep.sum()) < ids.numel()
    short = {
        "inputs_embeds": embeds[keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "token_type_ids": inputs["token_type_ids"][:, keep],
    }
    ref = logits(model, short)[0]
    torch.testing.assert_close(ours[keep], ref, atol=1e-4, rtol=1e-4)
    # the bidirectional blocks matter: causal-only is another model
    causal = logits(model, {k: v for k, v in short.items() if k != "token_type_ids"})[0]
    assert not torch.allclose(causal, ref, atol=1e-3)


def _reference_decoder(model, inputs, removed_from: dict, slot_windows=False, blocks=True):
    """Stock decoder layers run one by one with hand-built masks over the full sequence: padding,
    ``causal OR same image`` (when ``blocks``), ``AND`` the window of sliding layers in stock
    positions (or counted in kept slots with ``slot_windows``), and keys removed at an LLM merge
    layer ``k`` (``removed_from[k]``: (L,) bool) masked out from layer ``k`` on."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    n = ids.numel()
    with torch.inference_mode():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
        hidden = model.model.get_input_embeddings()(ids)
        hidden[ids == 1] = features
        hidden = hidden[None]
        positions = torch.arange(n)[None]
        rope = {t: lm.rotary_emb(hidden, positions, t) for t in set(lm.config.layer_types)}
        q, k = torch.arange(n)[:, None], torch.arange(n)[None]
        image = inputs["token_type_ids"][0] == 1
        run = torch.cumsum(image & ~torch.cat([torch.tensor([False]), image[:-1]]), 0)
        same = (run[:, None] == run[None]) & image[:, None] & image[None] if blocks else torch.zeros(n, n, dtype=bool)
        gone = torch.zeros(n, dtype=torch.bool)
        for i, layer in enumerate(lm.layers):
            gone = gone | removed_from.get(i, torch.zeros(n, dtype=torch.bool))
            allowed = (k <= q) | same
            if lm.config.layer_types[i] == "sliding_attention":
                where = torch.cumsum(~gone, 0) if slot_windows else torch.arange(n)
                allowed &= where[:, None] - where[None] < WINDOW
            allowed &= ~gone[None]
            kind = lm.config.layer_types[i]
            hidden = layer(
                hidden, attention_mask=allowed[None, None], position_embeddings=rope[kind], position_ids=positions
            )
        return model.lm_head(lm.norm(hidden))[0]


@pytest.mark.parametrize("llm_layers", [(2,), (1, 2)], ids=["merge-before-sliding-layer", "two-merges"])
def test_sliding_windows_count_stock_positions_after_llm_merges(photos, llm_layers):
    """LLM stage with pruning (survivors unchanged): every kept token's logits equal the stock
    decoder run on the whole sequence with the removed tokens masked out as keys from their merge
    layer on, sliding layers attending over the same *stock* positions window (8) as unreduced,
    image tokens both ways within their image. Counting the window in kept slots, or dropping the
    image blocks, gives other logits (so this test can tell)."""
    model = make()
    inputs = FAM.build([TWO_Q], [photos["cat"], photos["rocket"]])
    n = inputs["input_ids"].shape[1]
    assert n > 4 * WINDOW and FAM.config.text_config.layer_types[2] == "sliding_attention"
    illava.apply(model, IllavaConfig(llm_layers=llm_layers, llm_keep_ratio=0.5, recycle="prune"))
    from illava.tools.viz import trace

    traced, stats = trace(model, dict(inputs))
    removed_from, kept = {}, torch.ones(n, dtype=torch.bool)
    for layer, _, origin in traced.llm[1:]:
        now = torch.zeros(n, dtype=torch.bool)
        now[origin[0][origin[0] >= 0]] = True
        removed_from[layer], kept = kept & ~now, now
    assert [s.layer for s in stats.llm] == list(llm_layers) and int(kept.sum()) < n
    ours = logits(model, inputs)[0][kept]
    illava.remove(model)
    ref = _reference_decoder(model, inputs, removed_from)[kept]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    for other in (dict(slot_windows=True), dict(blocks=False)):
        assert not torch.allclose(_reference_decoder(model, inputs, removed_from, **other)[kept], ref, atol=1e-3)


@pytest.mark.parametrize("llm_layers", [(1,), (1, 2), (1, 2, 3)], ids=["1-llm-layer", "2-llm-layers", "3-llm-layers"])
def test_batch_equals_singles_with_several_images_per_sample(photos, llm_layers):
    """Two images in one sample, a text-only sample, one image (left padded in the batch)."""
    model = make()
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
        if group:
            total += illava.stats(model).visual_tokens()["after_llm"]
    assert total == after["after_llm"]


def test_generation_decodes_over_the_reduced_cache_with_stock_windows(photos):
    """Greedy generation with the LLM stage (pruning at layer 2, a sliding layer): every step's
    scores equal the hand-built reference over the whole sequence so far, the prompt tokens removed
    at the prefill masked out from layer 2 on: the decoding steps' windows over the (sliding,
    physically reduced) cache count stock positions too."""
    model = make()
    inputs = FAM.build([IMAGE_Q], [photos["cat"]])
    n = inputs["input_ids"].shape[1]
    illava.apply(model, IllavaConfig(llm_layers=(2,), llm_keep_ratio=0.4, recycle="prune"))
    from illava.tools.viz import trace

    traced, _ = trace(model, dict(inputs))
    (_, _, origin) = traced.llm[-1]
    removed = torch.ones(n, dtype=torch.bool)
    removed[origin[0][origin[0] >= 0]] = False
    assert int(removed.sum()) >= 5
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[1, 2],
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
    assert out.past_key_values.layers[3].get_seq_length() == n + 3 - int(removed.sum())
    illava.remove(model)
    for step in range(4):
        ids = out.sequences[:, : n + step]
        longer = dict(
            inputs, input_ids=ids, token_type_ids=torch.nn.functional.pad(inputs["token_type_ids"], (0, step))
        )
        ref = _reference_decoder(model, longer, {2: torch.nn.functional.pad(removed, (0, step))})[-1]
        ref = ref.index_fill(-1, torch.tensor([1, 2]), float("-inf"))
        torch.testing.assert_close(out.scores[step][0], ref, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_presets_for_published_sizes():
    from transformers import Gemma3ForConditionalGeneration

    from illava.tools.families.gemma3 import gemma3_config

    for size, depth, llm in (("4b", 34, (12,)), ("27b", 62, (24,))):
        config = gemma3_config(size)
        with torch.device("meta"):
            model = Gemma3ForConditionalGeneration(config)
        assert config.text_config.layer_types[llm[0] - 1] == "full_attention"  # scored at a global layer
        dims = illava.adapters.adapter_for(model).dimensions(model)
        assert (dims.encoder_depth, dims.tokens_per_crop, dims.llm_depth, dims.feature_layer, dims.unit) == (
            27, 4096, depth, 26, 16,
        )  # fmt: skip
        cfg = illava.configure(model, "image")
        assert cfg.encoder_layers == (5, 6, 7, 8) and cfg.encoder_removal == 512 and cfg.llm_layers == llm
        assert cfg.llm_keep_ratio == 0.7
        video = illava.configure(model, "video")  # no video in Gemma 3: the image preset
        assert (video.encoder_layers, video.encoder_removal, video.llm_layers) == (cfg.encoder_layers, 512, llm)


def test_tiny_preset_scores_at_a_global_layer_and_other_poolings_are_refused(photos):
    model = FAM.make()
    cfg = illava.configure(model, "image")
    assert cfg.llm_layers == (2,) and cfg.encoder_layers == (1, 2, 3) and cfg.encoder_removal == 32
    from illava.tools.families.gemma3 import tiny_gemma3_config

    config = tiny_gemma3_config()
    config.mm_tokens_per_image = 64  # 2x2 pooling
    from transformers import Gemma3ForConditionalGeneration

    other = Gemma3ForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="removes 4x4 blocks"):
        illava.apply(other, IllavaConfig(encoder_layers=(1,), encoder_removal=16))
    illava.apply(other, IllavaConfig(llm_layers=(2,), llm_keep_ratio=0.5))  # the LLM stage still works


def test_inputs_have_the_stock_layout(photos):
    from illava.tools.families.gemma3 import gemma3_config
    from illava.tools.inputs import placeholder_inputs

    inputs = placeholder_inputs(gemma3_config("4b"), [photos["coffee"].resize((1280, 720))])
    assert inputs["pixel_values"].shape == (1, 3, 896, 896)
    assert int((inputs["input_ids"] == 262_144).sum()) == 256 == int(inputs["token_type_ids"].sum())
    with pytest.raises(ValueError, match="takes no video"):
        FAM.build([chat("<video>\nwhat happens?")], (), [[photos["cat"]] * 2])
