"""Correct in every generate path, for every supported family (tiny random-weight models).

- ``off`` (and ``set_enabled(False)``) is stock transformers token for token in every generate mode
  (greedy, sampling, beams, return sequences, no cache, continuing from ``past_key_values``), under
  ``torch.compile(fullgraph=True)``, with packed inputs, right padding, save/load;
- with iLLaVA on: batch == singles with 1, 2 and 3 LLM merge layers, several merge layers equal one
  when the later ones keep everything, every generate mode runs and is consistent with its
  definition, multi-turn continuation, threads, copies, packed and right-padded inputs, labels.
"""

import copy
import threading

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava import IllavaConfig

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
VIDEO_Q = chat("<video>\nwhat happens?")
TEXT_Q = chat("describe a cat in one two three words")
SYSTEM_Q = chat("<image>\nwhat color?", system="You are a helpful assistant.")


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def fam(request):
    return request.param


PLACEHOLDERS = [1, 2]  # <image>, <video> of the test tokenizer


def generate(model, inputs, seed=0, **kw):
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("do_sample", False)
    # random weights may "answer" with a placeholder id, which no model can take as input again
    kw.setdefault("suppress_tokens", PLACEHOLDERS)
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(**inputs, return_dict_in_generate=True, output_scores=True, **kw)


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def suppressed(scores: torch.Tensor) -> torch.Tensor:
    """Next-token scores as generate() gives them with the placeholders suppressed."""
    return scores.index_fill(-1, torch.tensor(PLACEHOLDERS), float("-inf"))


def mixed_batch(fam, photos, frames):
    prompts, images, videos = [IMAGE_Q, TEXT_Q, SYSTEM_Q], [photos["cat"], photos["rocket"]], []
    if fam.videos:
        prompts.append(VIDEO_Q)
        videos = [frames]
    return prompts, images, videos


def singles(fam, prompts, images, videos):
    images, videos = iter(images), iter(videos)
    out = []
    for p in prompts:
        out.append(
            fam.build(
                [p],
                [next(images) for _ in range(p.count("<image>"))],
                [next(videos) for _ in range(p.count("<video>"))],
            )
        )
    return out


MODES = {
    "greedy": {},
    "sample": {"do_sample": True, "top_k": 0},
    "beams": {"num_beams": 3},
    "return_sequences": {"num_beams": 2, "num_return_sequences": 2},
    "sample_return_sequences": {"do_sample": True, "top_k": 0, "num_return_sequences": 2},
    "no_cache": {"use_cache": False},
    "chunked_prefill": {"prefill_chunk_size": 16},
}


def same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ off == stock
@pytest.mark.parametrize("mode", list(MODES))
def test_off_is_stock_in_every_generate_mode(fam, photos, frames, mode):
    model = fam.make()
    inputs = fam.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    stock = generate(model, inputs, **MODES[mode])
    illava.apply(model, "off")
    same_generation(generate(model, inputs, **MODES[mode]), stock)
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    illava.set_enabled(model, False)
    same_generation(generate(model, inputs, **MODES[mode]), stock)


def continue_conversation(fam, model, first, photos, new_text="and what color is it?", **kw):
    """Turn 1, then turn 2 continuing from turn 1's cache; returns both outputs and turn 2's inputs."""
    out1 = generate(model, first, max_new_tokens=3, **kw)
    answer = out1.sequences[:, first["input_ids"].shape[1] :]
    rows = first["input_ids"].shape[0]
    follow = fam.build([chat(new_text)] * rows)
    ids = torch.cat([out1.sequences, follow["input_ids"]], 1)
    mask = torch.ones_like(ids)
    mask[:, : first["attention_mask"].shape[1]] = first["attention_mask"]
    second = dict(first, input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in first:
        types = torch.zeros_like(ids)
        types[:, : first["input_ids"].shape[1]] = first["mm_token_type_ids"]
        second["mm_token_type_ids"] = types
    for key in ("pixel_values", "pixel_values_videos"):
        second.pop(key, None)
    cache = copy.deepcopy(out1.past_key_values)
    out2 = generate(model, second, cache=cache, max_new_tokens=3, **kw)
    return out1, out2, answer, second


def test_off_is_stock_when_continuing_from_past_key_values(fam, photos):
    model = fam.make()
    first = fam.build([IMAGE_Q], [photos["cat"]])
    stock = continue_conversation(fam, model, first, photos)
    illava.apply(model, "off")
    ours = continue_conversation(fam, model, first, photos)
    same_generation(ours[0], stock[0])
    same_generation(ours[1], stock[1])


def test_off_is_stock_under_fullgraph_compile(fam):
    from transformers import DynamicCache

    model = fam.make()
    ids = torch.randint(10, 200, (1, 12))
    results = {}
    for mode in ("stock", "off"):
        if mode == "off":
            illava.apply(model, "off")
        cache = DynamicCache(config=model.config.text_config)
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        with torch.inference_mode():
            prefill = compiled(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
            step = compiled(
                input_ids=ids[:, :1], attention_mask=torch.ones(1, 13, dtype=torch.long), past_key_values=cache
            )
        results[mode] = (prefill.logits, step.logits)
    torch._dynamo.reset()
    for a, b in zip(results["stock"], results["off"]):
        assert torch.equal(a, b)


def test_off_keeps_stock_errors_and_on_too(fam, photos):
    model = fam.make()
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    start = int((inputs["attention_mask"][0] == 0).sum()) + 3  # drop 3 tokens before the placeholders
    broken = dict(inputs, input_ids=inputs["input_ids"][:, start:], attention_mask=inputs["attention_mask"][:, start:])
    ids = broken["input_ids"]
    image_token = model.config.image_token_id
    # remove one placeholder: features and tokens no longer match
    where = (ids[0] == image_token).nonzero()[0, 0]
    broken["input_ids"] = torch.cat([ids[:, :where], ids[:, where + 1 :]], 1)
    broken["attention_mask"] = broken["attention_mask"][:, 1:]
    if "mm_token_type_ids" in broken:
        types = broken["mm_token_type_ids"][:, start:]
        broken["mm_token_type_ids"] = torch.cat([types[:, :where], types[:, where + 1 :]], 1)
    with pytest.raises(Exception) as stock_error:
        logits(model, broken)
    for config in ("off", "image"):
        illava.apply(model, config)
        with pytest.raises(type(stock_error.value)) as ours:
            logits(model, broken)
        assert str(ours.value) == str(stock_error.value)


def test_off_is_stock_for_packed_and_right_padded_inputs(fam, photos):
    model = fam.make()
    for inputs in (packed(fam, model, photos)[0], fam.build([IMAGE_Q, TEXT_Q], [photos["cat"]], padding_side="right")):
        ref = logits(model, inputs, use_cache=False)
        illava.apply(model, "off")
        assert torch.equal(logits(model, inputs, use_cache=False), ref)
        # the LLM stage on, but keeping everything: nothing is removed, so exactly stock
        illava.apply(model, IllavaConfig(llm_layers=(1, 2), llm_keep_ratio=1.0))
        assert torch.equal(logits(model, inputs, use_cache=False), ref)
        illava.remove(model)


def test_off_save_load_and_determinism(fam, photos, tmp_path):
    model = fam.make()
    inputs = fam.build([IMAGE_Q, TEXT_Q], [photos["coffee"]])
    ref = generate(model, inputs)
    illava.apply(model, "off")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    loaded.set_attn_implementation("sdpa")
    same_generation(generate(loaded, inputs), ref)
    illava.apply(loaded, "image")
    first, second = generate(loaded, inputs), generate(loaded, inputs)
    same_generation(first, second)


# ------------------------------------------------------------------------------ batch == singles
@pytest.mark.parametrize("llm_layers", [(1,), (1, 2), (1, 2, 3)], ids=["1-llm-layer", "2-llm-layers", "3-llm-layers"])
def test_batch_equals_singles(fam, photos, frames, llm_layers):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=llm_layers, keep=0.7))
    prompts, images, videos = mixed_batch(fam, photos, frames)
    batch = generate(model, fam.build(prompts, images, videos), max_new_tokens=6)
    n = batch.sequences.shape[1] - 6
    for i, single in enumerate(singles(fam, prompts, images, videos)):
        alone = generate(model, single, max_new_tokens=6)
        assert torch.equal(alone.sequences[0, -6:], batch.sequences[i, n:]), f"sample {i}"
        for step, (x, y) in enumerate(zip(alone.scores, batch.scores)):
            torch.testing.assert_close(x[0], y[i], atol=2e-4, rtol=2e-4, msg=f"sample {i} step {step}")


def test_later_merge_layers_that_keep_everything_change_nothing(fam, photos, frames):
    model = fam.make()
    prompts, images, videos = mixed_batch(fam, photos, frames)
    inputs = fam.build(prompts, images, videos)
    illava.apply(model, fam.both_stages(llm_layers=(1,), keep=0.5))
    ref = logits(model, inputs)
    for layers, keep in (((1, 2), (0.5, 1.0)), ((1, 2, 3), (0.5, 1.0, 1.0)), ((1, 3), (0.5, 1.0))):
        illava.apply(model, fam.both_stages(llm_layers=layers, keep=keep))
        torch.testing.assert_close(logits(model, inputs), ref, atol=1e-5, rtol=1e-5, msg=str(layers))


# ------------------------------------------------------------------------------ generate modes, on
def test_every_generate_mode_runs_with_illava_on(fam, photos, frames):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    prompts, images, videos = mixed_batch(fam, photos, frames)
    inputs = fam.build(prompts, images, videos)
    for mode, kw in MODES.items():
        out = generate(model, inputs, **kw)
        repeats = kw.get("num_return_sequences", 1)
        assert out.sequences.shape[0] == len(prompts) * repeats, mode
        assert all(torch.isfinite(s[s > -float("inf")]).all() for s in out.scores), mode


@pytest.mark.parametrize("mode", ["beams", "return_sequences"])
def test_beams_batch_equals_singles(fam, photos, mode):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    prompts, images = [IMAGE_Q, TEXT_Q, SYSTEM_Q], [photos["cat"], photos["rocket"]]
    batch = generate(model, fam.build(prompts, images), **MODES[mode])
    repeats = MODES[mode].get("num_return_sequences", 1)
    n = batch.sequences.shape[1] - 4
    for i, single in enumerate(singles(fam, prompts, images, [])):
        alone = generate(model, single, **MODES[mode])
        got = batch.sequences[i * repeats : (i + 1) * repeats, n:]
        assert torch.equal(alone.sequences[:, -4:], got), f"sample {i}"


def test_no_cache_generation_follows_its_definition(fam, photos):
    """Without a cache every step is a new prefill: encoder stage alone, identical to cached
    decoding; with the LLM stage, each step equals a full forward of the sequence so far."""
    model = fam.make()
    inputs = fam.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    illava.apply(model, "encoder-only")
    same_tokens = generate(model, inputs, use_cache=False).sequences
    assert torch.equal(same_tokens, generate(model, inputs).sequences)
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    out = generate(model, inputs, use_cache=False)
    ids = out.sequences
    n = inputs["input_ids"].shape[1]
    for step in range(4):
        full = dict(inputs, input_ids=ids[:, : n + step], attention_mask=torch.ones_like(ids[:, : n + step]))
        full["attention_mask"][:, :n] = inputs["attention_mask"]
        if "mm_token_type_ids" in inputs:
            types = torch.zeros_like(full["input_ids"])
            types[:, :n] = inputs["mm_token_type_ids"]
            full["mm_token_type_ids"] = types
        ref = suppressed(logits(model, full, use_cache=False)[:, -1])
        torch.testing.assert_close(out.scores[step], ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ multi-turn
def test_cache_reports_the_stock_length(fam, photos):
    model = fam.make()
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    stock = generate(model, inputs, max_new_tokens=3).past_key_values.get_seq_length()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    ours = generate(model, inputs, max_new_tokens=3).past_key_values
    assert ours.get_seq_length() == stock
    assert ours.layers[0].get_seq_length() < stock  # physically reduced


def test_continuing_a_conversation_equals_prefilling_it(fam, photos):
    """Encoder stage alone: turn 2 continued from turn 1's cache equals the whole conversation
    prefilled in one go."""
    model = fam.make()
    illava.apply(model, "encoder-only")
    first = fam.build([IMAGE_Q], [photos["cat"]])
    _, out2, _, second = continue_conversation(fam, model, first, photos)
    whole = dict(second)
    for key in ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "batch_num_images"):
        if key in first:
            whole[key] = first[key]
    one_go = generate(model, whole, max_new_tokens=3)
    assert torch.equal(out2.sequences, one_go.sequences)
    for x, y in zip(out2.scores, one_go.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_continuing_with_the_llm_stage_equals_feeding_the_new_turn_token_by_token(fam, photos):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    first = fam.build([IMAGE_Q, SYSTEM_Q], [photos["cat"], photos["coffee"]])
    out1, out2, _, second = continue_conversation(fam, model, first, photos)
    cache = copy.deepcopy(out1.past_key_values)
    ids, mask = second["input_ids"], second["attention_mask"]
    start = cache.get_seq_length()
    with torch.inference_mode():
        for t in range(start, ids.shape[1]):
            step = {"input_ids": ids[:, t : t + 1], "attention_mask": mask[:, : t + 1], "cache": cache}
            # positions as generate() makes them (left padding; Qwen: M-RoPE deltas of turn 1)
            positions = model._prepare_position_ids_for_generation(ids[:, : t + 1], dict(step))
            step["position_ids"] = positions[..., -1:]
            last = model(**step).logits[:, -1]
    torch.testing.assert_close(out2.scores[0], suppressed(last), atol=1e-4, rtol=1e-4)


def test_continuing_with_a_new_image(fam, photos):
    """A new image in turn 2 is reduced like any prefill; the answer equals feeding turn 2 as one
    forward over the cache."""
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    first = fam.build([TEXT_Q])
    out1 = generate(model, first, max_new_tokens=2)
    follow = fam.build([chat("<image>\nand this?")], [photos["coffee"]])
    ids = torch.cat([out1.sequences, follow["input_ids"]], 1)
    mask = torch.cat([first["attention_mask"], torch.ones_like(ids[:, first["attention_mask"].shape[1] :])], 1)
    second = dict(follow, input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in follow:
        second["mm_token_type_ids"] = torch.cat([torch.zeros_like(out1.sequences), follow["mm_token_type_ids"]], 1)
    out2 = generate(model, second, cache=copy.deepcopy(out1.past_key_values), max_new_tokens=3)
    assert out2.sequences.shape[1] == ids.shape[1] + 3
    assert illava.stats(model).visual_tokens()["after_llm"] < illava.stats(model).visual_tokens()["stock"]
    assert all(torch.isfinite(s[:, 3:]).all() for s in out2.scores)


# ------------------------------------------------------------------------------ threads, copies
def test_two_threads_on_one_model(fam, photos):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    work = [fam.build([IMAGE_Q], [photos["cat"]]), fam.build([SYSTEM_Q, TEXT_Q], [photos["rocket"]])]
    expected = [generate(model, w, max_new_tokens=6).sequences for w in work]
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(generate(model, work[i], max_new_tokens=6).sequences)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert all(torch.equal(r, expected[i]) for r in results[i])


def test_deepcopy_gives_an_independent_model(fam, photos):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    ref = generate(model, inputs)
    stats = str(illava.stats(model))
    twin = copy.deepcopy(model)
    same_generation(generate(twin, inputs), ref)
    same_generation(generate(twin, inputs), ref)
    illava.apply(twin, "encoder-only")
    generate(twin, fam.build([TEXT_Q]))
    assert str(illava.stats(model)) == stats and illava.config_of(model).llm_layers == (1, 2)
    same_generation(generate(model, inputs), ref)
    illava.remove(twin)
    assert illava.is_applied(model)
    same_generation(generate(model, inputs), ref)


# ------------------------------------------------------------------------------ packed, right padding
def packed(fam, model, photos):
    """Two samples in one row, told apart by position ids (padding-free), no attention mask."""
    a, b = fam.build([IMAGE_Q], [photos["cat"]]), fam.build([SYSTEM_Q], [photos["rocket"]])
    out = {"input_ids": torch.cat([a["input_ids"], b["input_ids"]], 1)}
    positions = []
    for x in (a, b):
        n = x["input_ids"].shape[1]
        if "image_grid_thw" in x:
            rope, _ = model.model.get_rope_index(
                x["input_ids"],
                image_grid_thw=x["image_grid_thw"],
                attention_mask=x["attention_mask"],
                mm_token_type_ids=x["mm_token_type_ids"],
            )
            positions.append(torch.cat([torch.arange(n)[None, None], rope]))
        else:
            positions.append(torch.arange(n)[None])
    out["position_ids"] = torch.cat(positions, -1)
    for key in ("pixel_values", "image_sizes", "image_grid_thw"):
        if key in a:
            x, y = a[key], b[key]
            if x.dim() == 5:  # LLaVA-OneVision: (images, crops, 3, H, W), padded to the most crops
                crops = max(x.shape[1], y.shape[1])
                x, y = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, crops - t.shape[1])) for t in (x, y))
            out[key] = torch.cat([x, y])
    for key in ("mm_token_type_ids", "token_type_ids"):  # Gemma 3: token_type_ids
        if key in a:
            out[key] = torch.cat([a[key], b[key]], 1)
    return out, (a, b)


def test_packed_sequences_equal_each_sequence_alone(fam, photos):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    inputs, (a, b) = packed(fam, model, photos)
    row = logits(model, inputs, use_cache=False)[0]
    n = a["input_ids"].shape[1]
    for part, alone in ((slice(0, n), a), (slice(n, None), b)):
        ref = logits(model, alone, use_cache=False)[0]
        torch.testing.assert_close(row[part], ref, atol=1e-4, rtol=1e-4)


def test_right_padded_forward_equals_each_sample_alone(fam, photos):
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    prompts, images = [IMAGE_Q, TEXT_Q, SYSTEM_Q], [photos["cat"], photos["rocket"]]
    batch = fam.build(prompts, images, padding_side="right")
    out = logits(model, batch, use_cache=False)
    for i, single in enumerate(singles(fam, prompts, images, [])):
        n = int(batch["attention_mask"][i].sum())
        torch.testing.assert_close(out[i, :n], logits(model, single, use_cache=False)[0], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ shapes users send
def test_output_logits_keep_the_input_length(fam, photos):
    """Logits line up with the input tokens (a removed token's position holds the prediction of the
    last kept token before it), so labels and positions index them as with stock."""
    model = fam.make()
    inputs = fam.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    out = logits(model, inputs)
    assert out.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out).all()


def test_labels_give_the_loss_of_the_reduced_sequence_and_train(fam, photos):
    model = fam.make()
    inputs = fam.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    model.train()
    out = model(**inputs, labels=labels)
    # stock loss function over the returned logits: the text tokens' predictions
    ref = model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**inputs, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_output_attentions_include_the_merge_layers(fam, photos):
    model = fam.make("eager")
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    ref = vision_attentions(model, inputs)
    illava.apply(model, fam.both_stages())
    ours = vision_attentions(model, inputs)
    assert len(ours) == len(ref)
    for layer, (a, b) in enumerate(zip(ours, ref)):
        if layer <= min(fam.encoder_layers):  # before and at the first merge: stock maps
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:  # fewer tokens after a merge
            assert a.shape != b.shape


def vision_attentions(model, inputs):
    kwargs = {k: v for k, v in inputs.items() if k in ("image_sizes", "image_grid_thw")}
    with torch.inference_mode():
        out = model.model.get_image_features(inputs["pixel_values"], **kwargs, output_attentions=True, return_dict=True)
    return out.attentions


@pytest.mark.parametrize("size", [(4000, 50), (50, 4000), (2000, 30)])
def test_extreme_aspect_ratios(fam, size):
    from PIL import Image

    model = fam.make()
    picture = Image.new("RGB", size, (200, 30, 30))
    inputs = fam.build([IMAGE_Q], [picture])
    stock = generate(model, inputs)
    illava.apply(model, "image")
    out = generate(model, inputs)
    assert out.sequences.shape == stock.sequences.shape
    tokens = illava.stats(model).visual_tokens()
    assert tokens["after_llm"] <= tokens["after_encoder"] <= tokens["stock"]


# ------------------------------------------------------------------------------ apply / validation
def test_a_failed_reapply_keeps_the_previous_patch(fam, photos):
    model = fam.make()
    cfg = illava.apply(model, fam.both_stages())
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    ref = logits(model, inputs)
    with pytest.raises(ValueError):
        illava.apply(model, IllavaConfig(encoder_layers=(99,), encoder_removal=1))
    assert illava.config_of(model) == cfg
    torch.testing.assert_close(logits(model, inputs), ref)


def test_a_failed_forward_leaves_nothing_behind(fam, photos, frames):
    """A forward that raises (here: placeholders that do not match the features) must not leave
    per-call state that a later call on the same thread would pick up."""
    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    prompts, videos = ([IMAGE_Q, VIDEO_Q], [frames]) if fam.videos else ([IMAGE_Q], [])
    good = fam.build(prompts, [photos["cat"]], videos)
    ref = logits(model, good)
    broken = fam.build([IMAGE_Q], [photos["cat"]])
    broken["input_ids"] = broken["input_ids"].masked_fill(broken["input_ids"] == model.config.image_token_id, 100)
    with pytest.raises(ValueError, match="do not match"):
        logits(model, broken)
    assert model._illava.state.current() is None and model._illava.state.chunk() is None
    torch.testing.assert_close(logits(model, good), ref)
    text = fam.build([TEXT_Q])
    illava.remove(model)
    stock = logits(model, text)
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    assert torch.equal(logits(model, text), stock)


def test_per_call_state_does_not_accumulate(fam, photos):
    """What a call keys by its own tensors (for recomputation) goes when the call's tensors go."""
    import gc

    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    inputs = fam.build([IMAGE_Q, SYSTEM_Q], [photos["cat"], photos["rocket"]])
    for _ in range(3):
        logits(model, inputs)
        generate(model, inputs)
    gc.collect()
    assert len(model._illava.state.keyed._data) == 0


def test_an_unsupported_cache_is_a_clear_error_that_leaves_nothing_behind(fam, photos):
    from transformers import StaticCache

    model = fam.make()
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    cache = StaticCache(config=model.config.text_config, max_cache_len=1024)
    with pytest.raises(ValueError, match="DynamicCache"):
        logits(model, inputs, past_key_values=cache)
    assert model._illava.state.current() is None
    ref = logits(model, inputs)
    illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    torch.testing.assert_close(logits(model, inputs), ref)


def test_a_patched_model_pickles_and_loads_back_patched(fam, photos, tmp_path):
    """``torch.save`` of a patched model (illava creates its classes at run time): it loads back
    patched, with the same configuration and outputs, and ``remove`` restores stock there. (Saved
    before any forward: transformers installs an unpicklable output-capturing hook at the first
    forward, stock models included.)"""
    model = fam.make()
    inputs = fam.build([IMAGE_Q, TEXT_Q], [photos["cat"]])
    stock = logits(fam.make(), inputs)
    cfg = illava.apply(model, fam.both_stages(llm_layers=(1, 2)))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ours = logits(model, inputs)
    assert illava.is_applied(loaded) and illava.config_of(loaded) == cfg
    torch.testing.assert_close(logits(loaded, inputs), ours, atol=0, rtol=0, equal_nan=True)
    assert illava.stats(loaded).visual_tokens() == illava.stats(model).visual_tokens()
    illava.remove(loaded)
    assert torch.equal(logits(loaded, inputs), stock)


def test_a_pickled_patched_model_loads_in_a_fresh_process(tmp_path):
    """Where illava has not created its run-time classes yet (a new process), they are rebuilt. The
    forward there is text-only: a vision tower unpickled in a fresh process loses transformers'
    output capturing (registered per class when a model is constructed), stock models included."""
    import subprocess
    import sys

    fam = next(f for f in FAMILIES if f.name == "llava_onevision")
    model = fam.make()
    inputs = fam.build([TEXT_Q])
    cfg = illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5))
    expected = logits(copy.deepcopy(model), inputs)
    torch.save({"model": model, "inputs": dict(inputs), "logits": expected, "cfg": cfg}, tmp_path / "saved.pt")
    code = (
        "import torch, illava;"
        f"saved = torch.load({str(tmp_path / 'saved.pt')!r}, weights_only=False);"
        "m = saved['model'];"
        "assert illava.is_applied(m) and illava.config_of(m) == saved['cfg'];"
        "torch.testing.assert_close(m(**saved['inputs']).logits, saved['logits'], atol=0, rtol=0);"
        "name = type(m.model).__name__; illava.remove(m);"
        "print(name, type(m.model).__name__)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "IllavaLlavaOnevisionModel_LlavaOnevisionModel LlavaOnevisionModel"
