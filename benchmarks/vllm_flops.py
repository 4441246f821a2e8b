"""Prefill FLOPs of the vLLM bench's configurations, as a share of stock's, and the knob of a method
at a FLOPs budget: what ``illava bench --engine vllm --arch qwen2-vl-2b`` runs, measured with the
transformers backend's analytic FLOPs (``illava.tools.flops.prefill_flops``, the dimensions of the
published architecture) on the token counts of a narrow copy (every width cut, depths, patch and
image sizes kept: counts do not depend on widths for Qwen-VL, benchmarks/token_counts.py).

Runs in the main venv (the transformers backend); the vLLM bench then takes the printed specs.

    python benchmarks/vllm_flops.py --arch qwen2-vl-2b --size 448 --specs encoder-only tome --budget tome:0.33
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

import illava
from illava.tools.architectures import build_architecture
from illava.tools.budget import Meter, solve
from illava.tools.flops import prefill_flops
from illava.tools.inputs import placeholder_inputs


class WideMeter(Meter):
    """``Meter`` whose FLOPs use the dimensions of ``wide`` (the published model, on the meta device)
    and the token counts of the narrow model it runs."""

    def __init__(self, model, inputs, wide):
        self.wide = wide
        super().__init__(model, inputs)

    def point(self, knob, config):
        point = super().point(knob, config)
        if point.valid:
            stats = illava.stats(self.model)
            sequence = int(self.inputs["attention_mask"][0].sum())
            point.gflops = prefill_flops(self.wide, stats, sequence, self.batch)["total"]
        return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2-vl-2b")
    parser.add_argument("--size", type=int, default=448, help="square image side (px)")
    parser.add_argument("--specs", nargs="*", default=["encoder-only", "tome"], help="presets or methods")
    parser.add_argument("--budget", nargs="*", default=["tome:0.33"], help="METHOD:SHARE solved for its knob")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    narrow = build_architecture(args.arch, narrow=True).eval()
    wide = build_architecture(args.arch, device="meta")
    image = Image.fromarray((np.random.RandomState(0).rand(args.size, args.size, 3) * 255).astype("uint8"))
    inputs = placeholder_inputs(narrow.config, [image], text_tokens=4)
    meter = WideMeter(narrow, inputs, wide)
    stock = meter.stock
    out = {"arch": args.arch, "image_size": args.size, "stock_gflops": stock.gflops, "stock_tokens": stock.tokens}
    rows = []
    for spec in args.specs:
        config = illava.configure(narrow, spec)
        point = meter.point(None, config)
        share = point.gflops / stock.gflops
        rows.append({"spec": spec, "share": share, "gflops": point.gflops, "tokens": point.tokens})
    for item in args.budget:
        method, share = item.split(":")
        solved = solve(narrow, method, float(share), inputs, meter=meter)
        spec = {"method": solved.method, "knob": solved.knob}
        rows.append({"spec": spec, "target": float(share), "share": solved.share, "gflops": solved.gflops,
                     "tokens": solved.tokens, "reached": solved.reached})  # fmt: skip
    meter.close()
    out["rows"] = rows
    for row in rows:
        print(f"{json.dumps(row['spec'])}: {100 * row['share']:.1f}% of stock prefill FLOPs, tokens {row['tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
