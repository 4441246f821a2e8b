"""Visual tokens per stage for the `image` and `video` presets at real LLaVA-OneVision sizes.

Random weights (compute and counts do not depend on weight values; which tokens survive does).
    python benchmarks/token_counts.py --size 0.5b --frames 32
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from skimage import data
from transformers import LlavaOnevisionForConditionalGeneration

import illava
from illava.architectures import llava_onevision_config
from illava.inputs import image_processor_for, placeholder_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="0.5b", choices=["0.5b", "7b", "72b"])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = llava_onevision_config(args.size)
    start = time.time()
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=getattr(torch, args.dtype)).eval()
    print(f"built LLaVA-OneVision-{args.size} with random weights in {time.time() - start:.0f}s", flush=True)
    processor = image_processor_for(config)
    wide = Image.fromarray(np.asarray(Image.fromarray(data.astronaut()).resize((1280, 720))))
    frames = [Image.fromarray(data.astronaut()).rotate(3 * i) for i in range(args.frames)]
    cases = {
        "image 384x384": ("image", [Image.fromarray(data.astronaut()).resize((384, 384))], []),
        "image 1280x720": ("image", [wide], []),
        f"video {args.frames} frames": ("video", [], [frames]),
    }
    results = {}
    for name, (preset, images, videos) in cases.items():
        inputs = placeholder_inputs(config, processor, images, videos)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
        cfg = illava.apply(model, preset)
        start = time.time()
        model(**inputs, use_cache=False, logits_to_keep=1)
        stats = illava.stats(model)
        results[name] = {"preset": preset, "config": str(cfg), **stats.as_dict()}
        print(f"\n== {name}, preset '{preset}' ({time.time() - start:.0f}s)\n{stats}", flush=True)
    illava.remove(model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
