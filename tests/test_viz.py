"""illava.tools.viz: exact source tracking for every family, a known kept region, output sizes,
and the command."""

import numpy as np
import pytest
import torch
from families import FAMILIES, chat
from PIL import Image
from typer.testing import CliRunner

import illava
from illava import IllavaConfig, Policy
from illava.adapters import adapter_for
from illava.tools import viz
from illava.tools.cli import app
from illava.tools.families import tools_for

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
VIDEO_Q = chat("<video>\nwhat happens?")


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def fam(request):
    return request.param


def decoder_input(model):
    """Capture the decoder input after illava's own compaction (hooks run in registration order)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def check_items(model, result, forward, stats, embeds):
    """Every unit is in exactly one token or dropped; the tokens of an item no unit reaches are
    exactly its newline tokens (LLaVA-OneVision), its register tokens (LLaVA with DINOv2 registers)
    or none; counts agree with the statistics."""
    from illava.adapters.llava_family import registers

    newline = getattr(model.model, "image_newline", None)
    head = registers(model.config.vision_config)
    _, rep0, _ = forward.llm[0]
    slots = {kind: mask.nonzero() for kind, mask in forward.placeholders.items()}
    start = {kind: 0 for kind in slots}
    for src, item in zip(result.items, stats.items):
        assert (src.kind, src.sample) == (item.kind, item.sample)
        for stage in src.stages:
            label = stage.label
            reached = label[label >= 0]
            if stage.name.startswith("encoder"):
                assert (label[reached] == reached).all()  # a representative represents itself
        item_slots = slots[item.kind][start[item.kind] : start[item.kind] + item.stock_tokens]
        start[item.kind] += item.stock_tokens
        layout = rep0[item_slots[:, 0], item_slots[:, 1]]
        layout = set(layout[layout >= 0].tolist())
        assert len(layout) == src.layout_tokens == item.tokens
        hit = set(np.unique(src.token0[src.token0 >= 0]).tolist())
        assert hit <= layout
        not_hit = sorted(layout - hit)
        if head:  # a DINOv2 tower's register tokens: the item's first tokens, no patch reaches them
            assert not_hit == sorted(layout)[:head]
        elif newline is None:
            assert not not_hit
        elif not_hit:
            features = embeds[item.sample, not_hit]
            assert torch.isclose(features, newline.to(features)[None], atol=1e-6).all()
    assert sum(i.tokens for i in result.items) == stats.visual_tokens()["after_llm"]
    assert sum(i.layout_tokens for i in result.items) == stats.visual_tokens()["after_encoder"]


@pytest.mark.parametrize("recycle", ["rank", "cluster", "prune"])
def test_source_tracking_is_exact(fam, photos, frames, recycle):
    model = fam.make()
    prompts, images, videos = (
        [IMAGE_Q, chat("<image>\n<image>\ncompare")],
        [photos["cat"], photos["rocket"], photos["coffee"]],
        [],
    )
    if fam.videos:
        prompts.insert(1, VIDEO_Q)
        videos = [frames]
    inputs = fam.build(prompts, images, videos)
    illava.apply(model, fam.both_stages(llm_layers=(1, 2), keep=0.6, recycle=recycle))
    seen, handle = decoder_input(model)
    forward, stats = viz.trace(model, dict(inputs))
    result = viz.visualize(model, dict(inputs), max_frames=99)
    handle.remove()
    assert [(i.kind, i.sample) for i in result.items] == [(i.kind, i.sample) for i in stats.items]
    check_items(model, result, forward, stats, seen["embeds"])
    for src in result.items:
        call = forward.calls[src.kind]
        enc = [s for s in src.stages if s.name.startswith("encoder")]
        assert [s.name for s in enc] == [f"encoder layer {layer}" for layer, _, _ in call.layers]
        for stage in enc:
            if recycle == "rank":
                assert (stage.label >= 0).all()  # rank recycles every removed unit
            if recycle == "prune":
                assert ((stage.label >= 0) == (stage.label == stage.own)).all()
        if recycle == "rank":
            assert ((src.final >= 0) == (src.token0 >= 0)).all()
    # survivors at every encoder layer match the counts of the statistics
    unit = adapter_for(model).unit
    for kind, call in forward.calls.items():
        units = sum(rows * cols for rows, cols in forward.units[kind].grids)
        extra = call.tokens - units * unit  # tokens that are never removed (a CLS token per crop)
        for (_, owner, _), (_, _, out) in zip(forward.units[kind].layers, call.layers):
            assert int((owner == torch.arange(owner.shape[0])).sum()) * unit + extra == out


def test_tracking_without_encoder_stage_maps_stock_layout(fam, photos):
    model = fam.make()
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    illava.apply(model, IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.6))
    seen, handle = decoder_input(model)
    forward, stats = viz.trace(model, dict(inputs))
    result = viz.visualize(model, dict(inputs))
    handle.remove()
    (src,) = result.items
    assert [s.name for s in src.stages] == ["LLM layer 1"]
    check_items(model, result, forward, stats, seen["embeds"])
    assert src.layout_tokens == stats.items[0].stock_tokens


class Brightness(Policy):
    """Scores that are the brightness of each patch (one merge layer: units in raster order)."""

    def __init__(self, brightness):
        self.brightness = brightness

    def scores(self, stage, attention):
        return self.brightness.expand_as(attention) if stage == "encoder" else attention


def test_hand_set_scores_keep_the_known_region(model, config, tokenizer):
    """A white square on black, and scores that are the brightness of each patch (a policy of the
    stage): with pruning, the survivors are exactly the patches of the square, and the picture
    shows just that."""
    from illava.tools.inputs import build

    side, ps = 8, 8  # tiny LLaVA-OneVision: 64 px crops of 8x8 patches
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 24:56] = 255  # patch rows 2-5, cols 3-6: 16 patches
    square = np.zeros((side, side), dtype=bool)
    square[2:6, 3:7] = True
    inputs = build(config, tokenizer, [IMAGE_Q], [Image.fromarray(pixels)])
    brightness = torch.tensor(square.flatten(), dtype=torch.float32) + 0.01 * torch.arange(64) / 64
    policy = Brightness(brightness)
    illava.apply(model, IllavaConfig(encoder_layers=(2,), encoder_removal=48, recycle="prune", policy=policy))
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


def test_pictures_are_the_photos_the_processor_made(fam, photos):
    model = fam.make()
    illava.apply(model, fam.both_stages())
    result = viz.visualize(model, dict(fam.build([IMAGE_Q], [photos["cat"]])))
    (src,) = result.items
    panel = src.panels[0]
    h, w = panel.image.shape[:2]
    assert panel.units.shape == (h // panel.cell, w // panel.cell)
    photo, expected = photos["cat"], [photos["cat"]]
    if h == w:  # or padded to a square with the mean colour first (LLaVA-1.5)
        mean = tools_for(model).image_processor(model.config).image_mean
        square = Image.new("RGB", (max(photo.size),) * 2, tuple(int(255 * m) for m in mean))
        square.paste(photo, ((square.width - photo.width) // 2, (square.height - photo.height) // 2))
        expected.append(square)
    resized = [np.asarray(e.resize((w, h), Image.BICUBIC)).astype(float) / 255 for e in expected]
    assert max(np.corrcoef(r.ravel(), panel.image.ravel())[0, 1] for r in resized) > 0.97


@pytest.fixture
def tiny_folder(tmp_path, fam):
    from illava.tools.families import tools_for

    fam.make().save_pretrained(tmp_path / "tiny")
    tools_for(fam.config).image_processor(fam.config).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("video", [False, True])
def test_viz_command_writes_pngs(fam, tiny_folder, tmp_path, video):
    if video and not fam.videos:
        pytest.skip(f"{fam.name} takes no video")
    out = tmp_path / "pictures"
    layers = ",".join(str(v) for v in fam.encoder_layers)
    args = ["viz", str(tiny_folder), "--out", str(out), "--encoder-layers", layers, "--llm-layers", "1"]
    args += ["--llm-keep-ratio", "0.6"]
    args += ["--encoder-removal", str(fam.encoder_removal)] + (["--video", "--frames", "4"] if video else [])
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "PNGs written" in result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names[0] == "00_input.png" and "summary.png" in names
    assert len(names) == 1 + 2 * len(fam.encoder_layers) + 1 + 1


def test_viz_needs_illava_applied(model, build, photos):
    with pytest.raises(ValueError, match="apply iLLaVA"):
        viz.visualize(model, dict(build([IMAGE_Q], [photos["cat"]])))
