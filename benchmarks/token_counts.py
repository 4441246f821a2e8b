"""Visual tokens per stage for the `image` and `video` presets at real architecture sizes.

Random weights: compute and counts do not depend on the weight values (which tokens survive does).
With --truncate, decoder layers after the last LLM merge layer are not built (no count depends on
them), so 7B-size models fit a 24 GB CPU machine in fp32.

    python benchmarks/token_counts.py --arch llava-onevision-qwen2-0.5b --frames 32
    python benchmarks/token_counts.py --arch qwen2-vl-7b --frames 8 --truncate
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from PIL import Image
from skimage import data

import illava
from illava.tools.architectures import architectures, build_architecture
from illava.tools.inputs import placeholder_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llava-onevision-qwen2-0.5b", choices=sorted(architectures()))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--truncate", action="store_true", help="build decoder layers only up to the last merge")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    astronaut = Image.fromarray(data.astronaut())
    frames = [astronaut.resize((640, 360)).rotate(3 * i) for i in range(args.frames)]
    cases = {
        "image 384x384": ("image", [astronaut.resize((384, 384))], []),
        "image 1280x720": ("image", [astronaut.resize((1280, 720))], []),
        f"video {args.frames} frames 640x360": ("video", [], [frames]),
    }
    meta = build_architecture(args.arch, device="meta")
    results = {}
    model, model_preset = None, None
    for name, (preset, images, videos) in cases.items():
        cfg = illava.resolve_config(meta, preset)
        depth = max(cfg.llm_layers) + 1 if args.truncate and cfg.llm_layers else None
        start = time.time()
        if model is None or model_preset != (depth, preset):
            model = None
            gc.collect()
            torch.manual_seed(0)
            model = build_architecture(args.arch, llm_layers=depth)
            model.lm_head = torch.nn.Identity()  # no count depends on the logits: save its memory
            model_preset = (depth, preset)
        built = time.time() - start
        illava.apply(model, cfg)
        start = time.time()
        model(**placeholder_inputs(model.config, images, videos), use_cache=False, logits_to_keep=1)
        stats = illava.stats(model)
        results[name] = {"preset": preset, "config": str(cfg), "decoder_layers_built": depth, **stats.as_dict()}
        print(f"\n== {args.arch}: {name}, preset '{preset}' (built {built:.0f}s, ran {time.time() - start:.0f}s)")
        print(f"config: {cfg}\n{stats}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
