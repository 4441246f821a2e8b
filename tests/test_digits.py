"""The digits check: data and questions (properties computed from the scenes), its training script on
a few steps, and the command line. The fidelity of the shipped model: tests/test_fidelity_digits.py."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from illava.tools.cli import app
from illava_tasks import digits as D

ROOT = Path(__file__).resolve().parent.parent


def test_split_is_by_sample_and_covers_all_digits():
    (train_x, train_y), (test_x, test_y) = D.split()
    assert len(train_y) == 1347 and len(test_y) == 450
    train = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in train for x in test_x)  # no test digit is seen in training
    assert set(train_y) == set(test_y) == set(range(10))


def test_scene_questions_follow_the_scene():
    _, pool = D.split()
    rng = random.Random(3)
    for _ in range(20):
        scene = D.make_scene(rng, pool)
        assert 3 <= len(scene.cells) <= 6 and scene.image.size == (D.CANVAS, D.CANVAS)
        for (r, c), (y, x, size) in scene.boxes.items():  # every digit inside its own cell
            assert r * D.CELL <= y and y + size <= (r + 1) * D.CELL
            assert c * D.CELL <= x and x + size <= (c + 1) * D.CELL
            ink = np.asarray(scene.image, dtype=np.float32)[y : y + size, x : x + size].max()
            assert ink > 150  # the digit was painted there
        values = list(scene.cells.values())
        for kind, question, answer in D.scene_questions(scene, rng):
            words = question.replace("?", "").split()
            if kind == "position":
                cell = next(rc for rc in scene.cells if D.place(*rc) in question)
                assert answer == str(scene.cells[cell])
            elif kind == "count":
                digit = int(words[2][0])
                assert answer == str(values.count(digit))
            elif kind == "relation":
                digit = int(words[-1])
                (r, c) = next(rc for rc, d in scene.cells.items() if d == digit)
                assert values.count(digit) == 1
                assert answer == str(scene.cells[(r, c + 1) if words[3] == "right" else (r, c - 1)])
            else:
                row = D.ROWS.index(words[2])
                assert answer.split() == [str(scene.cells[(row, c)]) for c in range(3) if (row, c) in scene.cells]


def test_clip_questions_follow_the_clip():
    _, pool = D.split()
    rng = random.Random(4)
    for _ in range(20):
        clip = D.make_clip(rng, pool)
        assert len(clip.frames) == D.FRAMES and all(f.size == (D.CROP, D.CROP) for f in clip.frames)
        for kind, question, answer in D.clip_questions(clip, rng):
            digit = int(question.replace("?", "").split()[-1])
            if kind == "video order":
                assert clip.digits.count(digit) == 1
                assert answer == str(clip.digits[clip.digits.index(digit) + 1])
            else:
                assert answer == str(clip.digits.count(digit))


def test_test_set_is_fixed_balanced_and_tokenizable():
    a, b = D.test_set(20), D.test_set(20)
    assert [(r.question, r.answer) for r in a.rows] == [(r.question, r.answer) for r in b.rows]
    assert np.array_equal(np.asarray(a.scenes[0].image), np.asarray(b.scenes[0].image))
    assert a.per_kind() == {k: 20 for k in D.KINDS}
    counts = [r.answer for r in a.rows if r.kind == "count"]
    assert "0" in counts and any(x != "0" for x in counts)  # absent and present digits are asked
    tokenizer = D.build_tokenizer()
    for r in a.rows:
        ids = tokenizer(D.prompt(r.question, r.video) + r.answer)["input_ids"]
        assert tokenizer.unk_token_id not in ids
    with pytest.raises(ValueError, match="unknown question kinds"):
        D.test_set(5, kinds=("colour",))


def test_scenes_are_seen_through_anyres_crops():
    """At least ~700 patches per image: a base view and four crops of 144 patches."""
    tokenizer = D.build_tokenizer()
    config = D.build_config(len(tokenizer))
    data = D.test_set(5, kinds=("position",))
    model = torch.nn.Module()
    model.config = config
    inputs = D.inputs_for(model, tokenizer, D.image_processor(), data, data.rows[:2])
    assert (
        inputs["pixel_values"].shape[1:] == (5, 3, D.CROP, D.CROP) and D.CROP // D.PATCH == 12
    )  # 5 x 144 = 720 patches
    assert (inputs["input_ids"] == config.image_token_id).sum(1).tolist() == [744, 744]
    video = D.test_set(5, kinds=("video count",))
    inputs = D.inputs_for(model, tokenizer, D.image_processor(), video, video.rows[:2])
    assert inputs["pixel_values_videos"].shape[1:] == (6, 3, D.CROP, D.CROP)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The training script on a few steps of both stages (one run for the tests below)."""
    out = tmp_path_factory.mktemp("digits") / "model"
    subprocess.run(
        [sys.executable, str(ROOT / "training" / "train_digits.py"), "--vision-steps", "2", "--steps", "2",
         "--scenes-per-step", "2", "--clips-per-step", "2", "--vision-scenes", "1", "--vision-clips", "1",
         "--attention-guide", "0.3", "--decoder-steps", "2", "--decoder-scenes", "1", "--decoder-clips", "1",
         "--align-steps", "2", "--view-positions", "--tune-steps", "2", "--cache-scenes", "2", "--cache-clips", "2",
         "--tune-scenes", "1", "--tune-clips", "1", "--eval-every", "1000", "--test-per-kind", "5", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return out


def test_training_script_runs_and_its_model_answers(trained):
    """The script saves a model in Hugging Face format, with its card and training log, that loads
    with the Auto classes and answers through ``generate``."""
    info = json.loads((trained / "training.json").read_text())
    assert info["steps"] == 2 and info["vision_steps"] == 2
    assert len(info["vision_log"]) == 1 and "scene_digit_patches_right" in info["vision_log"][0]
    assert info["decoder_log"][0]["step"] == 2 and "accuracy_after_2a_2b" in info["decoder_log"][-1]
    assert info["tune_log"][0]["step"] == 2 and "accuracy_after_2c" in info["tune_log"][-1]
    assert info["align_log"][0]["step"] == 2 and 0 <= info["align_log"][0]["digit_patches_nearest_right"] <= 1
    assert "exact-match accuracy" in (trained / "README.md").read_text().lower()
    model, tokenizer, processor = D.load(trained)
    data = D.test_set(5)
    answers, first = D.predict(model, tokenizer, processor, data)
    assert first.shape == (len(data.rows), len(tokenizer))
    assert torch.allclose(first.exp().sum(-1), torch.ones(len(data.rows)), atol=1e-4)
    scores = D.by_kind(data.rows, D.correct(data.rows, answers))
    assert set(scores) == set(info["test_accuracy"]) == {*D.KINDS, "all"}
    assert all(0 <= v <= 1 for v in scores.values())


def test_eval_command_table_json_and_plot(trained, tmp_path):
    runner = CliRunner()
    args = ["eval", "digits", "--model", str(trained), "--per-kind", "5", "--kinds", "position,video count",
            "--levels", "1.5", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "p.png")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["questions"] == {"position": 5, "video count": 5}
    names = [s["setting"] for s in report["scores"]]
    assert names[0] == "stock" and "image x1.5" in names and any("INVERTED" in n for n in names)
    stock = report["scores"][0]
    assert stock["agreement"] == 1.0 and stock["kl"] == 0.0 and stock["share"] == 1.0
    image = next(s for s in report["scores"] if s["setting"] == "preset image")
    assert image["share"] < 0.6 and image["video_share"] < 1.0
    assert image["visual_tokens"]["stock"] == 744 and image["visual_tokens"]["after_llm"] < 744
    assert (tmp_path / "p.png").stat().st_size > 5000
    result = runner.invoke(app, ["eval", "digits", "--model", str(trained), "--kinds", "colour"])
    assert result.exit_code == 2 and "unknown question kind colour" in result.output
    result = runner.invoke(app, ["eval", "digits", "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and "train_digits.py" in result.output


def test_methods_at_matched_budgets(trained, tmp_path):
    runner = CliRunner()
    args = ["eval", "digits", "--model", str(trained), "--per-kind", "5", "--kinds", "position,video order",
            "--methods", "illava-rank,tome", "--budgets", "0.5", "--json", str(tmp_path / "m.json")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "m.json").read_text())["scores"]
    assert [s["setting"] for s in scores] == ["stock", "illava-rank", "tome"]
    for s in scores[1:]:
        assert s["target"] == 0.5 and s["reached"]
        assert 0.45 <= s["share"] <= 0.5  # solved on an image question, within one token per stage
        assert s["video_share"] < 1.0  # the same configuration reduces the clips too
    result = runner.invoke(
        app, ["eval", "digits", "--model", str(trained), "--kinds", "video order", "--methods", "tome"]
    )
    assert result.exit_code == 2 and "image kind" in result.output


def test_attention_guide_points_at_the_tokens_stock_builds_from_the_digits():
    """The training aid's map of visual tokens (``scene_sequence_owners``, ``clip_sequence_owners``)
    agrees with the order stock LLaVA-OneVision packs the views in (base view, the crops' full grid
    with row-end tokens; video frames pooled 2x2 then one row-end token)."""
    sys.path.insert(0, str(ROOT / "training"))
    import train_digits as T
    from transformers import LlavaOnevisionModel

    model = LlavaOnevisionModel(D.build_config(len(D.build_tokenizer()))).eval()
    _, pool = D.split()
    rng = random.Random(5)
    for _ in range(3):
        scene = D.make_scene(rng, pool)
        views = torch.from_numpy(T.scene_token_labels(scene)).float()[..., None]  # digit per patch, 10: none
        packed, _ = model.pack_image_features(
            [views], torch.tensor([[D.CANVAS, D.CANVAS]]), image_newline=torch.tensor([-1.0])
        )
        digits = packed[0][:, 0].long()
        owners = torch.from_numpy(T.scene_sequence_owners(scene))
        cells = {r * 3 + c: d for (r, c), d in scene.cells.items()}
        expected = torch.tensor([cells[o] if o >= 0 else 10 for o in owners.tolist()])
        real = digits != -1  # the row-end tokens hold the newline value
        assert len(digits) == len(owners) == 744
        assert torch.equal(digits[real], expected[real]) and bool((owners[~real] == -1).all())
        assert (owners >= 0).sum() == 5 * len(scene.cells)  # one base-view patch + 2x2 crop patches each
    clip = D.make_clip(rng, pool)
    marked = torch.from_numpy(T.clip_token_labels(clip) != 10).float()[..., None]  # (frames, 144, 1)
    pooled = model.apply_pooling(marked).reshape(-1) > 0.5
    owners = torch.from_numpy(T.clip_sequence_owners(clip))
    assert len(owners) == pooled.numel() + 1 == 217
    assert torch.equal(owners[:-1] >= 0, pooled) and owners[-1] == -1
    frames = owners[:-1].reshape(D.FRAMES, -1)
    assert all(set(frames[f][frames[f] >= 0].tolist()) == {f} for f in range(D.FRAMES))


def test_symbolic_rows_hold_the_stock_layout():
    """Stage 2a's pixel-free rows: with every token kept, the stock token sequence of the same
    conversation (the placeholders expanded as the processor expands them) and its labels, each visual
    token the word embedding of the digit under it (the background vector elsewhere); with the
    background dropped, the digit and text tokens alone at their stock positions."""
    sys.path.insert(0, str(ROOT / "training"))
    import train_digits as T
    from transformers import LlavaOnevisionForConditionalGeneration

    from illava.tools.inputs import build

    tokenizer = D.build_tokenizer()
    config = D.build_config(len(tokenizer))
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = D.image_processor()
    embed = model.get_input_embeddings()
    words = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    background = torch.randn(config.text_config.hidden_size)
    _, pool = D.split()
    for video in (False, True):
        item = (D.make_clip if video else D.make_scene)(random.Random(7), pool)
        text, _ = T.conversation(item, video, 8, random.Random(1))
        media = {"videos": [item.frames]} if video else {"images": [item.image]}
        ids = build(config, tokenizer, [text], image_processor=processor, **media)["input_ids"][0]
        _, stock_labels, _ = T.conversation_batch(model, tokenizer, processor, [item], video, 8, random.Random(1))
        with torch.no_grad():
            x, mask, positions, labels = T.symbolic_batch(
                model, tokenizer, [item], video, 8, 1.0, random.Random(1), background
            )
            visual = ids == (config.video_token_id if video else config.image_token_id)
            digits = T.symbol_ids(item, video)
            assert x.shape[1] == len(ids) and bool(mask.all()) and torch.equal(positions[0], torch.arange(len(ids)))
            assert torch.equal(labels[0], stock_labels[0]) and (labels[0] != -100).sum() >= 4
            assert torch.allclose(x[0][~visual], embed(ids[~visual]))
            expected = torch.where((digits < 10)[:, None], embed(words[digits.clamp(max=9)]), background)
            assert torch.allclose(x[0][visual], expected)
            present = item.digits if video else list(item.cells.values())
            assert (digits < 10).sum() == (1 if video else 5) * len(present)  # frames: 1 token; scenes: 1 + 2x2
            x0, _, positions0, labels0 = T.symbolic_batch(
                model, tokenizer, [item], video, 8, 0.0, random.Random(1), background
            )
        full = torch.full((len(ids),), -1)
        full[visual] = digits
        kept = full != 10
        assert torch.equal(positions0[0], torch.nonzero(kept)[:, 0]) and torch.equal(labels0[0], stock_labels[0][kept])
        assert torch.allclose(x0[0], x[0][kept])


def test_view_positions_follow_stock_packing_and_pooling():
    """``view_positions``: the patch of its view every scene token comes from (stock packing of the
    base view and the crops) and the 2x2 patches every clip token averages (stock video pooling)."""
    sys.path.insert(0, str(ROOT / "training"))
    import train_digits as T
    from transformers import LlavaOnevisionModel

    model = LlavaOnevisionModel(D.build_config(len(D.build_tokenizer()))).eval()
    index = torch.arange(144).float()[None, :, None]
    packed, _ = model.pack_image_features(
        [index.expand(5, -1, -1)], torch.tensor([[D.CANVAS, D.CANVAS]]), image_newline=torch.tensor([-1.0])
    )
    spots = T.view_positions(False)
    assert spots.shape == (744, 4) and torch.equal(packed[0][:, 0].long(), spots[:, 0])
    assert bool((spots == spots[:, :1]).all())
    pooled = model.apply_pooling(index.expand(D.FRAMES, -1, -1)).reshape(-1)
    spots = T.view_positions(True)
    assert spots.shape == (217, 4) and bool((spots[-1] == -1).all())
    assert torch.allclose(pooled, spots[:-1].float().mean(1))
    # symbolic rows with ``where``: each visual token gains the mean of its patches' rows, text nothing
    tokenizer = D.build_tokenizer()
    full = __import__("transformers").LlavaOnevisionForConditionalGeneration(model.config).eval()
    clip = D.make_clip(random.Random(2), D.split()[1])
    where, background = torch.randn(144, 128), torch.randn(128)
    with torch.no_grad():
        plain = T.symbolic_batch(full, tokenizer, [clip], True, 4, 1.0, random.Random(0), background)[0][0]
        placed = T.symbolic_batch(full, tokenizer, [clip], True, 4, 1.0, random.Random(0), background, where)[0][0]
    text, _ = T.conversation(clip, True, 4, random.Random(0))
    at = tokenizer(text)["input_ids"].index(model.config.video_token_id)
    added = torch.zeros_like(plain)
    added[at : at + 216] = where[spots[:-1]].mean(1)
    assert torch.allclose(placed - plain, added, atol=1e-5)


def test_feature_rows_are_the_stock_forward():
    """Stage 2c's rows from cached vision features: with every token kept, the same logits as the
    stock forward of the whole model on pixels (images and videos, two items of different lengths in
    one batch); with the background dropped, the stock embeddings of the kept tokens at their stock
    positions."""
    sys.path.insert(0, str(ROOT / "training"))
    import train_digits as T
    from transformers import LlavaOnevisionForConditionalGeneration

    from illava.tools.inputs import build

    tokenizer = D.build_tokenizer()
    config = D.build_config(len(tokenizer))
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = D.image_processor()
    _, pool = D.split()
    scenes, clips = T.cache_features(model, processor, pool, random.Random(3), 2, 2, chunk=1)
    for video, (items, feats) in ((False, scenes), (True, clips)):
        assert feats.shape[:3] == (2, D.FRAMES if video else 5, 144)
        with torch.no_grad():
            visual = T.visual_tokens(model, feats, video)
            x, mask, positions, labels = T.symbolic_batch(
                model, tokenizer, items, video, 8, 1.0, random.Random(1), visual=visual
            )
            same = random.Random(1)  # the conversations symbolic_batch drew
            texts = [T.conversation(item, video, 8, same)[0] for item in items]
            media = {"videos": [c.frames for c in items]} if video else {"images": [s.image for s in items]}
            stock = build(config, tokenizer, texts, image_processor=processor, **media)
            assert stock["attention_mask"].sum(1).tolist() == mask.sum(1).tolist()
            expected = model(**stock).logits
            got = model(inputs_embeds=x, attention_mask=mask, position_ids=positions).logits
            for b in range(2):
                ours = got[b][mask[b].bool()]
                theirs = expected[b][stock["attention_mask"][b].bool()]
                assert torch.allclose(ours, theirs, atol=1e-4), (video, b)
            x0, mask0, positions0, _ = T.symbolic_batch(
                model, tokenizer, items, video, 8, 0.0, random.Random(1), visual=visual
            )
        for b in range(2):
            kept = positions0[b][mask0[b].bool()]
            assert len(kept) < mask[b].sum()
            assert torch.allclose(x0[b][mask0[b].bool()], x[b][kept], atol=1e-6)
