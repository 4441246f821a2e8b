"""illava.viz: exact source tracking, known kept regions, output sizes, and the command."""

import numpy as np
import pytest
import torch
from conftest import chat
from PIL import Image
from typer.testing import CliRunner

import illava
from illava import IllavaConfig, viz
from illava.adapters import llava_onevision as lo
from illava.cli import app

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
VIDEO_Q = chat("<video>\nwhat happens?")


def decoder_inputs(model):
    """Capture the decoder input after illava's own compaction: embeddings and item of every slot."""
    seen = {}
    state = model._illava_state

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
        seen["item_ids"] = state.session.item_ids.clone()
        return None

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def check_item(src, embeds, item_ids, n, newline, steps_count):
    """Every unit belongs to exactly one token or is dropped; tokens no unit reaches are newlines."""
    units = src.token0.shape[0]
    for stage in src.stages:
        label = stage.label
        assert label.shape == (units,)
        reached = label[label >= 0]
        if stage.name.startswith("encoder"):
            # a representative represents itself: exactly one survivor per unit
            assert (label[reached] == reached).all()
    token0 = src.token0
    slots = (item_ids == n).nonzero()
    assert slots.shape[0] == src.layout_tokens
    features = embeds[slots[:, 0], slots[:, 1]]
    hit = set(np.unique(token0[token0 >= 0]).tolist())
    not_hit = set(range(src.layout_tokens)) - hit
    if newline is None:
        assert not not_hit
    else:
        is_newline = torch.isclose(features, newline.to(features)[None], atol=1e-6).all(-1)
        assert not_hit == set(is_newline.nonzero().flatten().tolist())
        assert not hit & not_hit
    final = src.final
    assert ((final >= -1) & (final < src.tokens)).all()
    if steps_count:
        kept0 = src.stages[-1].label  # LLM-input token of the representative of each unit
        assert ((kept0 >= 0) == (final >= 0)).all()
    return hit, not_hit


@pytest.mark.parametrize("recycle", ["rank", "cluster", "prune"])
def test_llava_source_tracking_is_exact(model, build, photos, frames, recycle):
    # order of images follows the samples: cat (sample 0), rocket and coffee (sample 2)
    inputs = build(
        [IMAGE_Q, VIDEO_Q, chat("<image>\n<image>\ncompare")],
        [photos["cat"], photos["rocket"], photos["coffee"]],
        [frames],
    )
    illava.apply(model, "image", recycle=recycle)
    seen, handle = decoder_inputs(model)
    result = viz.visualize(model, dict(inputs))
    handle.remove()
    stats = illava.stats(model)
    assert [i.kind for i in result.items] == ["image", "image", "image", "video"]
    assert [i.sample for i in result.items] == [0, 2, 2, 1]
    newline = model.model.image_newline
    for n, src in enumerate(result.items):
        steps = [s for s in src.stages if s.name.startswith("LLM")]
        check_item(src, seen["embeds"], seen["item_ids"], n, newline, len(steps))
        item = stats.items[n]
        crops = item.crops
        per_crop = src.token0.shape[0] // crops
        assert per_crop == 64
        # survivors per crop at every encoder layer match the configured counts
        enc = [s for s in src.stages if s.name.startswith("encoder")]
        call = stats.encoder[0] if src.kind == "image" else stats.encoder[1]
        for stage, (_, _, out) in zip(enc, call["layers"]):
            survivors = (stage.label == stage.own).reshape(crops, per_crop).sum(1)
            assert (survivors == out // call["crops"]).all()
            if recycle == "rank":
                assert (stage.label >= 0).all()  # rank recycles every removed token
            if recycle == "prune":
                assert ((stage.label >= 0) == (stage.label == stage.own)).all()
        if recycle == "rank":
            assert ((src.final >= 0) == (src.token0 >= 0)).all()
    assert sum(i.tokens for i in result.items) == stats.visual_tokens()["after_llm"]
    assert sum(i.layout_tokens for i in result.items) == stats.visual_tokens()["after_encoder"]


def test_tracking_without_encoder_stage_maps_stock_layout(model, build, photos):
    inputs = build([IMAGE_Q], [photos["cat"]])
    illava.apply(model, "llm-only")
    seen, handle = decoder_inputs(model)
    result = viz.visualize(model, dict(inputs))
    handle.remove()
    (src,) = result.items
    assert [s.name for s in src.stages] == ["LLM layer 1"]
    hit, not_hit = check_item(src, seen["embeds"], seen["item_ids"], 0, model.model.image_newline, 1)
    # stock layout: every patch of the base view and every unpadded crop patch is one token
    assert len(hit) + len(not_hit) == src.layout_tokens == illava.stats(model).items[0].stock_tokens


def test_hand_set_scores_keep_the_known_region(model, config, tokenizer, monkeypatch):
    """A white square on black, and scores that are the brightness of each patch: with pruning,
    the survivors are exactly the patches of the square, and the picture shows just that."""
    from illava.inputs import build_inputs, image_processor_for

    side, ps = 8, 8  # tiny config: 64 px crops of 8x8 patches
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 24:56] = 255  # patch rows 2-5, cols 3-6: 16 patches
    square = np.zeros((side, side), dtype=bool)
    square[2:6, 3:7] = True
    processor = image_processor_for(config)
    inputs = build_inputs(config, tokenizer, processor, [IMAGE_Q], [Image.fromarray(pixels)])
    illava.apply(model, IllavaConfig(encoder_layers=(2,), encoder_removal=48, llm_layers=(), recycle="prune"))
    state = model._illava_state
    brightness = torch.tensor(square.flatten(), dtype=torch.float32) + 0.01 * torch.arange(64) / 64
    real = lo.attention_with_received_scores

    def hand_set(q, k, v, scale):
        out, received = real(q, k, v, scale)
        trace = state.encoder_trace
        positions = trace.positions if trace is not None else torch.arange(q.shape[2]).expand(q.shape[0], -1)
        return out, brightness[positions]

    monkeypatch.setattr(lo, "attention_with_received_scores", hand_set)
    result = viz.visualize(model, dict(inputs))
    (src,) = result.items
    stage = src.stages[0]
    for crop in range(src.token0.shape[0] // 64):
        kept = (stage.label == stage.own)[crop * 64 : (crop + 1) * 64].reshape(side, side)
        assert (kept == square).all()
    # drawn: kept cells keep their pixels (white), the others are greyed (0.45 of full scale)
    picture = np.asarray(result.images["encoder layer 2"]).astype(float) / 255
    factor = picture.shape[0] // (side * ps)
    cell = ps * factor
    centres = picture[cell // 2 :: cell, cell // 2 :: cell][:side, :side].mean(-1)  # base view, first panel
    assert np.allclose(centres[square], 1.0, atol=0.02)
    assert np.allclose(centres[~square], 0.45, atol=0.02)
    heat = np.asarray(result.images["encoder layer 2 scores"]).astype(float)
    heat_centres = heat[cell // 2 :: cell, cell // 2 :: cell][:side, :side].sum(-1)
    assert heat_centres[square].min() > heat_centres[~square].max()


def test_output_sizes_and_files(model, build, photos, frames, tmp_path):
    inputs = build([IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    illava.apply(model, "image")
    result = viz.visualize(model, dict(inputs), max_frames=3)
    cfg = illava.config_of(model)
    expected = ["input"]
    for layer in cfg.encoder_layers:
        expected += [f"encoder layer {layer} scores", f"encoder layer {layer}"]
    expected += [f"LLM layer {layer}" for layer in cfg.llm_layers]
    assert list(result.images) == expected
    image, video = result.items
    assert [p.name for p in image.panels][0] == "base view" and len(image.panels) == 2
    assert [p.name for p in video.panels] == ["frame 0", "frame 2", "frame 3"]  # 3 of 4 frames, evenly
    base = image.panels[0].image  # the base view rebuilt from pixel_values: the photo squeezed to 64x64
    resized = np.asarray(photos["cat"].resize((64, 64), Image.BICUBIC)).astype(float) / 255
    assert np.corrcoef(resized.ravel(), base.ravel())[0, 1] > 0.98
    factor = 2  # 8 px cells are drawn at 16 px
    widths = [p.units.shape[1] * p.cell * factor for p in image.panels]
    heights = [p.units.shape[0] * p.cell * factor for p in image.panels]
    video_w = sum(p.units.shape[1] * p.cell * factor for p in video.panels) + 6 * 2
    size = (max(sum(widths) + 6, video_w), max(heights) + 10 + 64 * factor)
    assert all(im.size == size for im in result.images.values())
    paths = result.save(tmp_path / "out")
    assert len(paths) == len(expected) + 1 and all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert paths[-1].name == "summary.png"


@pytest.fixture
def tiny_folder(tmp_path, model, config):
    from illava.inputs import image_processor_for

    model.save_pretrained(tmp_path / "tiny")
    image_processor_for(config).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("video", [False, True])
def test_viz_command_writes_pngs(tiny_folder, tmp_path, video):
    out = tmp_path / "pictures"
    args = ["viz", str(tiny_folder), "--out", str(out)] + (["--video", "--frames", "4"] if video else [])
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "PNGs written" in result.output
    assert (out / "summary.png").exists() and (out / "00_input.png").exists()
    assert len(list(out.glob("*.png"))) == 1 + 2 * 4 + 1 + 1


def test_viz_needs_illava_applied(model, build, photos):
    with pytest.raises(ValueError, match="apply iLLaVA"):
        viz.visualize(model, dict(build([IMAGE_Q], [photos["cat"]])))


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("recycle", ["rank", "prune"])
def test_qwen_tracking_is_exact_at_block_granularity(version, recycle, tokenizer, photos, frames):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from illava.architectures import tiny_qwen_vl_config
    from illava.inputs import build_qwen_inputs, qwen_image_processor

    cls = {"2": Qwen2VLForConditionalGeneration, "2.5": Qwen2_5_VLForConditionalGeneration}[version]
    cfg = tiny_qwen_vl_config(version)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    processor = qwen_image_processor(max_pixels=112 * 168)
    inputs = build_qwen_inputs(cfg, tokenizer, processor, [IMAGE_Q, VIDEO_Q], [photos["cat"]], [frames])
    illava.apply(
        model,
        IllavaConfig(encoder_layers=(1, 3), encoder_removal=0.3, llm_layers=(1,), llm_keep_ratio=0.6, recycle=recycle),
    )
    seen, handle = decoder_inputs(model)
    result = viz.visualize(model, dict(inputs))
    handle.remove()
    stats = illava.stats(model)
    image, video = result.items
    for n, src in enumerate(result.items):
        check_item(src, seen["embeds"], seen["item_ids"], n, None, 1)
        t, h, w = stats.items[n].trace["grid_thw"]
        assert src.token0.shape[0] == t * h * w // 4  # one unit per 2x2 block
        enc = [s for s in src.stages if s.name.startswith("encoder")]
        for stage, (_, _, out) in zip(enc, stats.encoder[n]["layers"]):
            assert (stage.label == stage.own).sum() * 4 == out
    assert [p.name for p in video.panels] == ["frame 0", "frame 1"]  # 4 frames, temporal patches of 2
    # the picture rebuilt from pixel_values is the photo the processor resized
    panel = image.panels[0]
    h, w = panel.image.shape[:2]
    assert panel.units.shape == (h // panel.cell, w // panel.cell) and panel.cell == 2 * cfg.vision_config.patch_size
    resized = np.asarray(photos["cat"].resize((w, h), Image.BICUBIC)).astype(float) / 255
    assert np.corrcoef(resized.ravel(), panel.image.ravel())[0, 1] > 0.98
    assert sum(i.tokens for i in result.items) == stats.visual_tokens()["after_llm"]


def test_viz_command_on_qwen2_5_vl(tmp_path, tokenizer):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from illava.architectures import tiny_qwen_vl_config
    from illava.inputs import qwen_image_processor

    cfg = tiny_qwen_vl_config("2.5")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(tmp_path / "qwen")
    qwen_image_processor(max_pixels=112 * 168).save_pretrained(tmp_path / "qwen")
    out = tmp_path / "pictures"
    args = ["viz", str(tmp_path / "qwen"), "--out", str(out), "--encoder-layers", "1,3", "--encoder-removal", "0.3"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [
        "00_input.png",
        "01_encoder_layer_1_scores.png",
        "02_encoder_layer_1.png",
        "03_encoder_layer_3_scores.png",
        "04_encoder_layer_3.png",
        "summary.png",
    ]
