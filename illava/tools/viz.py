"""Pictures of what iLLaVA merged, stage by stage, on the image or video the model saw.

``visualize(model, inputs)`` runs one prefill with source tracking on and returns a
``Visualization``: for every stage an image (PIL) and a summary figure (matplotlib).

Source tracking, one format for every family (``illava.state.UnitTrace``, ``ForwardTrace``),
derived after the forward from each encoder call (``units_of``: the family's ``_illava_units``). A
*unit* is what the encoder stage removes: a patch, or a 2x2 block of patches for families whose
projector folds blocks into one LLM token. For every unit the trace holds:

- per encoder merge layer, the unit whose token now represents it (itself while it survives, the
  survivor it was recycled into, or -1 once pruned) and the score it had at that layer;
- the feature row that holds it after the layout of survivors (unpadding, newline tokens,
  pooling), hence the input position of the LLM it ended up at, or -1;
- per LLM merge layer, the input position of the token that represents it after the layer.

Where stock transformers does the layout itself (no encoder stage: bilinear pooling of video
frames, or of AnyRes crops beyond the ``anyres_max`` budget), a unit is assigned to the pooled
token whose cell contains it: exact for the token counts, approximate for interpolation weights.

Drawing. Pruned units are greyed out; recycled units are tinted with the colour of the survivor
that absorbed them, and that survivor is outlined in the same colour; survivors that absorbed
nothing get a thin white outline. Heat maps colour the units present at a layer by the rank of
their score (bright: high), so that maps of heavy-tailed attention scores stay readable. The
pictures come from the family's tooling (``illava.tools.families``: ``pictures``): AnyRes crops in place on the canvas
the processor tiled, video frames, 2x2-block cells for Qwen-VL, tiles for InternVL.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..api import is_applied
from .families import tools_for
from .families.base import Panel

_MIN_CELL_PX = 12  # cells are drawn at least this large (tiny test models have small crops)


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
    final: np.ndarray  # (U,) position (in the reduced sequence) of the token holding the unit at the end, -1: dropped
    tokens: int  # visual tokens of the item after the last stage
    layout_tokens: int  # tokens of the item entering the LLM (newline tokens included)
    token0: np.ndarray  # (U,) decoder-input token of every unit (after the placeholder compaction), -1: none


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
def trace(model: torch.nn.Module, inputs: dict):
    """Run one prefill of ``model`` (iLLaVA applied) with source tracking; its ``ForwardTrace``
    and statistics."""
    if not is_applied(model):
        raise ValueError("illava.viz: apply iLLaVA to the model first (illava.apply(model, ...))")
    state = model._illava.state
    with state.recording(), torch.no_grad():
        model(**inputs, use_cache=False)
    stats = state.last_stats
    if stats.trace is None or not stats.items:
        raise ValueError("illava.viz: the inputs hold no image or video")
    missing = [kind for kind in {i.kind for i in stats.items} if kind not in stats.trace.calls]
    if missing:
        raise RuntimeError(f"illava.viz: the forward pass produced {missing} features outside an encoder call")
    units_of(model, stats.trace)
    return stats.trace, stats


def units_of(model, forward) -> dict:
    """The source tracking of every encoder call of ``forward`` (``ForwardTrace.units``), derived after
    the forward from the calls by the family's model mixin (``FeatureCalls._illava_units``)."""
    inner = model._illava.state.adapter.parts(model).inner
    forward.units = {kind: inner._illava_units(call) for kind, call in forward.calls.items()}
    return forward.units


def item_sources(model, inputs: dict, forward, stats, mean_std=None) -> list[ItemSources]:
    """Stages of every unit of every item (image / video), in the order of ``stats.items``."""
    tools = tools_for(model)
    out: list[ItemSources] = []
    for kind in ("image", "video"):
        items = [i for i in stats.items if i.kind == kind]
        if not items:
            continue
        call = forward.calls[kind]
        panels_per_item = tools.pictures(model, inputs, kind, call, mean_std)
        where = forward.placeholders[kind].nonzero()  # row-major: feature row -> input position
        unit_trace = forward.units[kind]
        feature = unit_trace.feature.cpu()
        present = feature >= 0
        rows = where[feature.clamp(min=0)]
        sample, position = rows[:, 0], rows[:, 1]
        _, rep0, origin0 = forward.llm[0]
        token0 = torch.where(present, rep0[sample, position], -1)  # decoder-input token of every unit
        grids = [g[0] * g[1] for g in unit_trace.grids]
        starts = np.cumsum([0, *grids])
        crop, slot = 0, 0
        for item, panels in zip(items, panels_per_item):
            crops = item.crops or 1
            units = slice(int(starts[crop]), int(starts[crop + crops]))
            crop += crops
            panels = [Panel(p.name, p.image, np.where(p.units >= 0, p.units - units.start, -1), p.cell) for p in panels]
            stages = [
                Stage(
                    f"encoder layer {layer}",
                    owner[units].numpy() - units.start,
                    np.arange(units.stop - units.start),
                    scores[units].numpy(),
                )
                for layer, owner, scores in unit_trace.layers
            ]
            for stage in stages:
                stage.label = np.where(stage.label >= -units.start, stage.label, -1)
            own = torch.where(present[units], position[units], -1)
            final = torch.where(present[units], rep0[sample[units], position[units]], -1)
            for layer, rep, origin in forward.llm[1:]:
                current = torch.where(present[units], rep[sample[units], position[units]], -1)
                label = torch.where(current >= 0, origin[sample[units], current.clamp(min=0)], -1)
                stages.append(Stage(f"LLM layer {layer}", label.numpy(), own.numpy()))
                final = current
            slots = where[slot : slot + item.stock_tokens]
            slot += item.stock_tokens
            last = forward.llm[-1][1][slots[:, 0], slots[:, 1]]
            tokens = int(torch.unique(last[last >= 0]).numel())
            out.append(
                ItemSources(
                    kind, item.sample, panels, stages, final.numpy(), tokens, item.tokens, token0[units].numpy()
                )
            )
    return sorted(out, key=lambda src: (src.sample, src.kind != "image"))


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
    forward, stats = trace(model, inputs)
    items = item_sources(model, inputs, forward, stats, mean_std)
    for src in items:
        if src.kind == "video" and len(src.panels) > max_frames:
            keep = np.linspace(0, len(src.panels) - 1, max_frames).round().astype(int)
            src.panels = [src.panels[i] for i in sorted(set(keep.tolist()))]
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
