"""Visual tokens per stage for the `image` and `video` presets at real architecture sizes.

Random weights: compute and counts do not depend on the weight values (which tokens survive does).
With --truncate, decoder layers after the last LLM merge layer and vision layers after the last
encoder merge layer are not built (no count depends on them where the model reads the encoder's
last layer; LLaVA-1.5 / NeXT read layer -2, so --truncate does not apply to them), so 7B-size
models fit a 24 GB CPU machine in fp32. With --narrow, every width (hidden, MLP, heads) is cut to a
few dozen while depths, patch and image sizes, tiling and presets stay: where counts depend on
nothing else (checked: InternVL2.5-8B, Qwen2-VL-7B and Qwen2.5-VL-7B give the counts of their
full-width runs) InternVL2.5-26B takes seconds instead of hours. Where survivors cut away by AnyRes
unpadding or row-end tokens follow the weights (LLaVA-OneVision, LLaVA-NeXT: the family tooling's
``counts_depend_on_weights``), --narrow is refused.

    python benchmarks/token_counts.py --arch llava-onevision-qwen2-0.5b --frames 32
    python benchmarks/token_counts.py --arch qwen2-vl-7b --frames 8 --truncate
    python benchmarks/token_counts.py --arch internvl2.5-26b --narrow --cases 1280x720
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
from illava.tools.families import tools_for
from illava.tools.inputs import placeholder_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llava-onevision-qwen2-0.5b", choices=sorted(architectures()))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--truncate", action="store_true", help="build layers only up to the last merge of each stage")
    parser.add_argument("--narrow", action="store_true", help="cut every width (counts do not depend on it)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cases", default="384x384,1280x720,video", help="comma-separated: 384x384, 1280x720, video")
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
    wanted = args.cases.split(",")
    cases = {name: case for name, case in cases.items() if any(w in name for w in wanted)}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    meta = build_architecture(args.arch, device="meta")
    if args.narrow and tools_for(meta.config).counts_depend_on_weights:
        parser.error(
            f"--narrow: {meta.config.model_type}'s token counts depend on the weights; "
            "run at full width (with --truncate where it applies)"
        )
    results = {}
    model, model_preset = None, None
    for name, (preset, images, videos) in cases.items():
        cfg = illava.configure(meta, preset)
        depth = max(cfg.llm_layers) + 1 if args.truncate and cfg.llm_layers else None
        vision = max(cfg.encoder_layers) + 1 if args.truncate and cfg.encoder_layers else None
        start = time.time()
        if model is None or model_preset != (depth, vision, preset):
            model = None
            gc.collect()
            torch.manual_seed(0)
            model = build_architecture(
                args.arch, dtype=dtype, llm_layers=depth, vision_layers=vision, narrow=args.narrow
            )
            model.lm_head = torch.nn.Identity()  # no count depends on the logits: save its memory
            model_preset = (depth, vision, preset)
        built = time.time() - start
        illava.apply(model, cfg)
        start = time.time()
        inputs = placeholder_inputs(model.config, images, videos)
        inputs = {k: v.to(dtype) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        model(**inputs, use_cache=False, logits_to_keep=1)
        stats = illava.stats(model)
        layers = {"decoder_layers_built": depth, "vision_layers_built": vision, "narrow": args.narrow}
        results[name] = {"preset": preset, "config": str(cfg), **layers, **stats.as_dict()}
        print(f"\n== {args.arch}: {name}, preset '{preset}' (built {built:.0f}s, ran {time.time() - start:.0f}s)")
        print(f"config: {cfg}\n{stats}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
