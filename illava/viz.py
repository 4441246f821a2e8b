"""Pictures of what iLLaVA merged, stage by stage, on the image or video the model saw.

``visualize(model, inputs)`` runs one prefill with source tracking on and returns a
``Visualization``: for every stage an image (PIL) and a summary figure (matplotlib).

Source tracking. A *unit* is what the vision encoder starts with: a patch of a crop or frame
(LLaVA-OneVision), or a 2x2 block of patches (Qwen2-VL / Qwen2.5-VL, whose patch merger folds
each block into one LLM token, and whose encoder stage removes whole blocks). For every unit the
trace holds:

- per encoder merge layer, the unit whose token now represents it (itself while it survives, the
  survivor it was recycled into, or -1 once pruned) and the score it had at that layer;
- the LLM-input token it ended up in (after the survivor layout: unpadding, newline tokens,
  pooling), or -1;
- per LLM merge layer, the LLM-input token that represents that token after the layer.

Where stock transformers does the layout itself (no encoder stage: bilinear pooling of video
frames, or of AnyRes crops beyond the ``anyres_max`` budget), a unit is assigned to the pooled
token whose cell contains it: exact for the token counts, approximate for interpolation weights.

Drawing. Pruned units are greyed out; recycled units are tinted with the colour of the survivor
that absorbed them, and that survivor is outlined in the same colour; survivors that absorbed
nothing get a thin white outline. Heat maps colour the units present at a layer by the rank of
their score (bright: high), so that maps of heavy-tailed attention scores stay readable. AnyRes
crops are drawn in place on the high-resolution canvas the processor tiled, next to the base view;
videos are strips of frames; Qwen-VL is drawn at 2x2-block granularity.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .api import is_applied

# processor normalisation used to turn pixel_values back into pictures
_MEAN_STD = {
    "llava_onevision": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "qwen_vl": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
_MIN_CELL_PX = 12  # cells are drawn at least this large (tiny test models have small crops)


@dataclass
class Panel:
    """One picture a unit grid is drawn on: an image and the unit of every cell (-1: none)."""

    name: str
    image: np.ndarray  # (H, W, 3) float in [0, 1], H = rows * cell, W = cols * cell
    units: np.ndarray  # (rows, cols) unit index
    cell: int  # pixels per cell


@dataclass
class Stage:
    """Labels of every unit of one item after one stage."""

    name: str
    label: np.ndarray  # (U,) key of the token representing the unit, -1: dropped
    own: np.ndarray  # (U,) key of the unit's own token: label == own means the unit's token survived
    scores: np.ndarray | None = None  # (U,) score at this layer, NaN where not present


@dataclass
class ItemSources:
    """Source tracking of one image or video (see the module docstring)."""

    kind: str
    sample: int
    panels: list[Panel]
    stages: list[Stage]
    final: np.ndarray  # (U,) index of the final visual token of the item holding the unit, -1: dropped
    tokens: int  # visual tokens of the item after the last stage
    layout_tokens: int  # tokens of the item entering the LLM (newline tokens included)
    token0: np.ndarray  # (U,) LLM-input token of every unit


@dataclass
class Visualization:
    items: list[ItemSources]
    images: dict[str, Image.Image] = field(default_factory=dict)

    def compact_stages(self) -> list[str]:
        """The input, the scores of the first encoder merge layer, the last encoder merge layer and
        every LLM merge layer: the path of the tokens in a few pictures."""
        names = list(self.images)
        encoder = [n for n in names if n.startswith("encoder") and not n.endswith("scores")]
        scores = [n for n in names if n.endswith("scores")]
        llm = [n for n in names if n.startswith("LLM")]
        return ["input"] + scores[:1] + encoder[-1:] + llm

    def figure(self, max_width_px: int = 2400, stages: list[str] | None = None):
        """A matplotlib figure: one row per stage (``stages``: names of ``images``, default all),
        every item's panels side by side."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        names = list(self.images) if stages is None else stages
        widths = [self.images[n].width for n in names]
        heights = [self.images[n].height for n in names]
        scale = min(1.0, max_width_px / max(widths))
        dpi = 100
        fig_w = max(max(widths) * scale / dpi + 0.6, 7.0)
        fig_h = sum(h * scale for h in heights) / dpi + 0.35 * len(names) + 0.6
        fig, axes = plt.subplots(
            len(names), 1, figsize=(fig_w, fig_h), dpi=dpi, gridspec_kw={"height_ratios": heights}, squeeze=False
        )
        for ax, name in zip(axes[:, 0], names):
            ax.imshow(np.asarray(self.images[name]))
            ax.set_title(name, loc="left", fontsize=10)
            ax.axis("off")
        fig.text(
            0.01,
            0.002,
            "grey: removed without recycling; tint: recycled into the survivor outlined in the same colour; "
            "thin white outline: survivor; heat maps: rank of the score (bright = high)",
            fontsize=8,
            wrap=True,
            va="bottom",
        )
        fig.tight_layout(rect=(0, 0.4 / fig_h, 1, 1))
        return fig

    def save(
        self, folder: str | Path, summary: str = "summary.png", compact: bool = False, max_width_px: int = 2400
    ) -> list[Path]:
        """Write one PNG per stage and the summary figure (``compact``: only ``compact_stages``);
        returns the paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (name, image) in enumerate(self.images.items()):
            path = folder / f"{i:02d}_{_slug(name)}.png"
            image.save(path)
            paths.append(path)
        import matplotlib.pyplot as plt

        fig = self.figure(max_width_px, self.compact_stages() if compact else None)
        path = folder / summary
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
        return paths


# ------------------------------------------------------------------------------------ tracing
def trace(model: torch.nn.Module, inputs: dict) -> list:
    """Run one prefill of ``model`` (iLLaVA applied) with source tracking; the visual items with
    their ``trace`` and the LLM-stage steps per item."""
    if not is_applied(model):
        raise ValueError("illava.viz: apply iLLaVA to the model first (illava.apply(model, ...))")
    state = model._illava_state
    state.record = True
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        state.record = False
    items = list(state.stats.items)
    if any(i.trace is None for i in items):
        raise RuntimeError("illava.viz: the forward pass produced visual items without source tracking")
    return [(i, state.llm_trace.get(n, [])) for n, i in enumerate(items)]


def sources(item, llm_steps) -> tuple[list[Stage], np.ndarray]:
    """Stages of one item and the final token of every unit."""
    t = item.trace
    token0 = t["token0"].numpy()
    units = token0.shape[0]
    own = np.arange(units)
    stages = []
    for layer, owner, scores in t["encoder"]:
        stages.append(Stage(f"encoder layer {layer}", owner.numpy(), own, scores.numpy()))
    final = token0.copy()
    for layer, assign0, kept0 in llm_steps:
        assign0, kept0 = assign0.numpy(), kept0.numpy()
        present = token0 >= 0
        current = np.where(present, assign0[np.clip(token0, 0, None)], -1)
        label = np.where(current >= 0, kept0[np.clip(current, 0, None)], -1)
        stages.append(Stage(f"LLM layer {layer}", label, token0))
        final = current
    return stages, final


# ------------------------------------------------------------------------------------ panels
def _unnormalise(pixels: torch.Tensor, family: str, mean_std=None) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) in [0, 1]."""
    mean, std = mean_std or _MEAN_STD[family]
    x = pixels.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _llava_panels(model, item, pixels: torch.Tensor, mean_std) -> list[Panel]:
    """Base view; AnyRes crops in place on the canvas; video frames. ``pixels`` (crops, 3, S, S)."""
    t = item.trace
    side = t["side"]
    ps = model.config.vision_config.patch_size
    span = side * ps
    images = [_unnormalise(p, "llava_onevision", mean_std)[:span, :span] for p in pixels[: t["crops"]]]
    grid = np.arange(side * side).reshape(side, side)
    if t["kind"] == "video":
        return [Panel(f"frame {f}", im, grid + f * side * side, ps) for f, im in enumerate(images)]
    panels = [Panel("base view", images[0], grid, ps)]
    if t["crops"] > 1:
        gh, gw = t["grid"]
        canvas = np.zeros((gh * span, gw * span, 3))
        units = np.zeros((gh * side, gw * side), dtype=np.int64)
        for c, im in enumerate(images[1:]):
            r, q = divmod(c, gw)
            canvas[r * span : (r + 1) * span, q * span : (q + 1) * span] = im
            units[r * side : (r + 1) * side, q * side : (q + 1) * side] = grid + (c + 1) * side * side
        panels.append(Panel(f"{t['crops'] - 1} crops in place", canvas, units, ps))
    return panels


def _qwen_frames(model, pixels: torch.Tensor, grid_thw, mean_std) -> list[np.ndarray]:
    """Undo the Qwen-VL processor's patch flattening: (patches, C*T*ps*ps) -> frames (H, W, 3)."""
    vc = model.config.vision_config
    ps, tps, m = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    gt, gh, gw = grid_thw
    x = pixels.float().cpu().reshape(gt, gh // m, gw // m, m, m, -1, tps, ps, ps)
    # -> (gt, tps, C, gh//m, m, ps, gw//m, m, ps)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(gt, tps, -1, gh * ps, gw * ps)
    return [_unnormalise(frame[0], "qwen_vl", mean_std) for frame in x]


def _qwen_panels(model, item, pixels: torch.Tensor, mean_std) -> list[Panel]:
    t = item.trace
    gt, gh, gw = t["grid_thw"]
    m = t["merge_size"]
    cell = m * model.config.vision_config.patch_size
    rows, cols = gh // m, gw // m
    frames = _qwen_frames(model, pixels, (gt, gh, gw), mean_std)
    grid = np.arange(rows * cols).reshape(rows, cols)
    name = "frame" if t["kind"] == "video" else "image"
    return [Panel(f"{name} {f}" if gt > 1 else name, im, grid + f * rows * cols, cell) for f, im in enumerate(frames)]


def item_pixels(model, inputs: dict, items) -> list[torch.Tensor]:
    """The pixel values each visual item came from, in the order of ``items``."""
    out = []
    kinds = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
    counters = {"image": 0, "video": 0}
    offsets = {"image": 0, "video": 0}
    for item in items:
        key, grid_key = kinds[item.kind]
        pixels = inputs[key]
        n = counters[item.kind]
        counters[item.kind] += 1
        if item.trace["family"] == "qwen_vl":
            patches = int(np.prod(inputs[grid_key][n].tolist()))
            out.append(pixels[offsets[item.kind] : offsets[item.kind] + patches])
            offsets[item.kind] += patches
        else:
            out.append(pixels.reshape(-1, *pixels.shape[-4:])[n])
    return out


# ------------------------------------------------------------------------------------ drawing
def _colours(labels: np.ndarray) -> np.ndarray:
    hue = (np.maximum(labels, 0) * 0.6180339887) % 1.0
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.9, 1.0) for h in hue.ravel()]).reshape(*labels.shape, 3)
    return rgb


def _upsample(grid: np.ndarray, cell: int) -> np.ndarray:
    return np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)


def draw_stage(panel: Panel, stage: Stage) -> np.ndarray:
    """The panel with ``stage``'s merging drawn on it: (H, W, 3) in [0, 1]."""
    units = panel.units
    present = units >= 0
    safe = np.clip(units, 0, None)
    label = np.where(present, stage.label[safe], -1)
    own = np.where(present, stage.own[safe], -2)
    dropped = label < 0
    survivor = (label == own) & ~dropped
    recycled = ~dropped & ~survivor
    # groups that absorbed something, over all units of the item (not just this panel)
    absorbing = np.unique(stage.label[(stage.label >= 0) & (stage.label != stage.own)])
    merged_group = np.isin(label, absorbing) & ~dropped
    colour = _colours(label)
    img = panel.image
    grey = img.mean(axis=-1, keepdims=True) * 0.35 + 0.45
    cell = panel.cell
    px = lambda grid: _upsample(grid, cell)  # noqa: E731
    out = np.where(px(dropped)[..., None], grey, img)
    out = np.where(px(recycled)[..., None], 0.4 * img + 0.6 * px(colour), out)
    # outlines of survivors: coloured for groups that absorbed tokens, thin white otherwise
    width = max(1, cell // 6)
    yy, xx = np.indices(out.shape[:2])
    border = (yy % cell < width) | (yy % cell >= cell - width) | (xx % cell < width) | (xx % cell >= cell - width)
    thin = (yy % cell == 0) | (xx % cell == 0)
    coloured_edge = border & px(survivor & merged_group)
    white_edge = thin & px(survivor & ~merged_group)
    out = np.where(coloured_edge[..., None], px(colour), out)
    out = np.where(white_edge[..., None], 0.5 * out + 0.5, out)
    return out


def draw_scores(panel: Panel, scores: np.ndarray) -> np.ndarray:
    """Heat map of ``scores`` (ranked over the units present) over the panel."""
    import matplotlib

    units = panel.units
    finite = np.isfinite(scores)
    ranks = np.full(scores.shape, np.nan)
    if finite.sum() > 1:
        order = np.argsort(np.argsort(scores[finite], kind="stable"), kind="stable")
        ranks[finite] = order / (finite.sum() - 1)
    elif finite.any():
        ranks[finite] = 1.0
    values = np.where(units >= 0, ranks[np.clip(units, 0, None)], np.nan)
    heat = matplotlib.colormaps["inferno"](np.nan_to_num(values))[..., :3]
    cell = panel.cell
    img = panel.image
    grey = img.mean(axis=-1, keepdims=True) * 0.35 + 0.45
    mixed = 0.35 * img + 0.65 * _upsample(heat, cell)
    return np.where(_upsample(np.isnan(values), cell)[..., None], grey, mixed)


def _to_pil(array: np.ndarray, cell: int) -> Image.Image:
    image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    if cell < _MIN_CELL_PX:
        factor = math.ceil(_MIN_CELL_PX / cell)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return image


def _stack(images: list[Image.Image], horizontal: bool, gap: int) -> Image.Image:
    """Images side by side (``horizontal``) or one under the other, on white, ``gap`` pixels apart."""
    along = [i.width if horizontal else i.height for i in images]
    across = max(i.height if horizontal else i.width for i in images)
    length = sum(along) + gap * (len(images) - 1)
    out = Image.new("RGB", (length, across) if horizontal else (across, length), "white")
    offset = 0
    for image, size in zip(images, along):
        out.paste(image, (offset, 0) if horizontal else (0, offset))
        offset += size + gap
    return out


def _row(images: list[Image.Image]) -> Image.Image:
    return _stack(images, True, 6)


def _column(images: list[Image.Image]) -> Image.Image:
    return _stack(images, False, 10)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ------------------------------------------------------------------------------------ front door
def visualize(model: torch.nn.Module, inputs: dict, max_frames: int = 8, mean_std=None) -> Visualization:
    """Source tracking and pictures of one prefill of ``model`` (iLLaVA applied) on ``inputs``.

    ``inputs`` are the stock model inputs (processor output). ``max_frames`` limits the frames
    drawn per video; ``mean_std`` overrides the processor normalisation used to show the pixels.
    """
    traced = trace(model, inputs)
    if not traced:
        raise ValueError("illava.viz: the inputs hold no image or video")
    items: list[ItemSources] = []
    for (item, steps), pixels in zip(traced, item_pixels(model, inputs, [i for i, _ in traced])):
        family = item.trace["family"]
        panels = (_llava_panels if family == "llava_onevision" else _qwen_panels)(model, item, pixels, mean_std)
        if item.kind == "video" and len(panels) > max_frames:
            keep = np.linspace(0, len(panels) - 1, max_frames).round().astype(int)
            panels = [panels[i] for i in sorted(set(keep.tolist()))]
        stages, final = sources(item, steps)
        tokens = item.tokens if not steps else int(steps[-1][2].shape[0])
        items.append(
            ItemSources(
                item.kind, item.sample, panels, stages, final, tokens, item.tokens, item.trace["token0"].numpy()
            )
        )
    viz = Visualization(items)
    rows: dict[str, list[Image.Image]] = {"input": []}
    for src in items:
        rows["input"].append(_row([_to_pil(p.image, p.cell) for p in src.panels]))
        for stage in src.stages:
            if stage.scores is not None:
                rows.setdefault(f"{stage.name} scores", []).append(
                    _row([_to_pil(draw_scores(p, stage.scores), p.cell) for p in src.panels])
                )
            rows.setdefault(stage.name, []).append(_row([_to_pil(draw_stage(p, stage), p.cell) for p in src.panels]))
    viz.images = {name: _column(images) for name, images in rows.items()}
    return viz
