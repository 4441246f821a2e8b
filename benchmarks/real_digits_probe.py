"""Can the real frozen tower read the digits scenes? A linear probe on its patch features (issue 26).

    python benchmarks/real_digits_probe.py --json benchmarks/results/real_digits_probe.json

Before training a VLM on the digits scenes (``illava_tasks.digits``) with the real DINOv2-S/14 of
``illava.tools.realparts`` frozen in front, this measures what its features hold: for every digit of
``--train`` scenes of training digits and ``--test`` scenes of unseen test digits, the patch features of
the 3x3 patch neighbourhood around the digit's centre (224 px input, as the assembled LLaVA sees a
scene: 16x16 patches of 14 px) are flattened and a logistic regression (scikit-learn) is fitted to
the digit's class. Its accuracy on unseen digits bounds what a decoder reading those features can
answer about one digit: ``position``, ``relation`` and ``read`` need every digit read right.

It runs for the digit size of the task (32 px on the 384 px canvas: 18.7 px, 1.3 patches, at 224
px) and for larger digits (``--sizes``), at the tower's last layer (what the LLaVA reads) and at
earlier layers (``--layers``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def scene_features(vision, processor, digits, pool, count: int, seed: int, size: int, layers: list[int]):
    """{layer: (digits, 9 * width)} features of the 3x3 patches around every digit, and the labels."""
    scenes = []
    rng = random.Random(seed)
    saved = digits.DIGIT, digits._slot
    digits.DIGIT = size
    if size != saved[0]:  # larger digits: anywhere in their cell, 6 px from its edges
        digits._slot = lambda r, span: r.randint(6, span - size - 6)
    try:
        scenes = [digits.make_scene(rng, pool) for _ in range(count)]
    finally:
        digits.DIGIT, digits._slot = saved
    out = {layer: [] for layer in layers}
    labels = []
    scale = 224 / digits.CANVAS / 14
    with torch.inference_mode():
        for start in range(0, count, 16):
            chunk = scenes[start : start + 16]
            pixels = processor([s.image for s in chunk], return_tensors="pt")["pixel_values"]
            hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
            grids = {layer: hidden[layer][:, 1:].reshape(len(chunk), 16, 16, -1) for layer in layers}
            for k, scene in enumerate(chunk):
                for cell, (y, x, s) in scene.boxes.items():
                    row = int(min(15, max(0, (y + s / 2) * scale)))
                    col = int(min(15, max(0, (x + s / 2) * scale)))
                    r0, c0 = min(13, max(0, row - 1)), min(13, max(0, col - 1))
                    for layer in layers:
                        out[layer].append(grids[layer][k, r0 : r0 + 3, c0 : c0 + 3].reshape(-1).numpy())
                    labels.append(scene.cells[cell])
    return {layer: np.stack(v) for layer, v in out.items()}, np.asarray(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=300, help="scenes of training digits")
    parser.add_argument("--test", type=int, default=120, help="scenes of unseen test digits")
    parser.add_argument("--sizes", default="32,48", help="digit sizes on the 384 px canvas (32: the task's)")
    parser.add_argument(
        "--layers", default="12,8,4", help="hidden-state indices (12: the last layer, what the LLaVA reads)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    from sklearn.linear_model import LogisticRegression

    from illava.tools import realparts
    from illava_tasks import digits

    vision = realparts._dinov2_224(realparts.dinov2_small()[0]).eval()
    processor = realparts.image_processor()
    train_pool, test_pool = digits.split()
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    for size in (int(x) for x in args.sizes.split(",")):
        t = time.time()
        xtr, ytr = scene_features(vision, processor, digits, train_pool, args.train, 0, size, layers)
        xte, yte = scene_features(vision, processor, digits, test_pool, args.test, 1, size, layers)
        for layer in layers:
            probe = LogisticRegression(max_iter=3000, C=0.1).fit(xtr[layer], ytr)
            row = {
                "digit_px_on_canvas": size,
                "digit_px_at_224": round(size * 224 / digits.CANVAS, 1),
                "layer": layer,
                "train_digits": len(ytr),
                "test_digits": len(yte),
                "train_accuracy": round(probe.score(xtr[layer], ytr), 4),
                "test_accuracy": round(probe.score(xte[layer], yte), 4),
            }
            rows.append(row)
            print(
                f"digits of {size} px ({row['digit_px_at_224']} px at 224), layer {layer:2d}: "
                f"unseen digits {100 * row['test_accuracy']:.1f}% of {len(yte)} "
                f"(train {100 * row['train_accuracy']:.1f}%)  [{time.time() - t:.0f} s]"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "script": "benchmarks/real_digits_probe.py",
            "args": vars(args) | {"json": str(args.json)},
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
