"""Produce the README's results table: stock vs patched-but-disabled vs iLLaVA, alternated.

CPU rows: LLaVA-OneVision-0.5B architecture (random weights), fp32, one 384x384 image, `image`
preset. With a CUDA device (--device cuda): bf16, SDPA, 7B architectures.

    python benchmarks/readme_table.py --device cpu --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from illava.tools import bench

CASES = {
    "cpu": [("llava-onevision-qwen2-0.5b", "image", False, torch.float32)],
    "cuda": [
        ("llava-onevision-qwen2-7b", "image", False, torch.bfloat16),
        ("llava-onevision-qwen2-7b", "video", True, torch.bfloat16),
        ("qwen2-vl-7b", "image", False, torch.bfloat16),
        ("qwen2.5-vl-7b", "image", False, torch.bfloat16),
    ],
}


def row(report: dict, preset: str) -> str:
    r, s = report["ratios"], report["settings"]
    tokens = s["illava"]["visual_tokens"]
    return (
        f"| {report['model']} | {report['device']} | {report['dtype']} | {preset} | "
        f"{tokens['stock']} -> {tokens['after_encoder']} -> {tokens['after_llm']} | "
        f"{s['stock']['metrics']['prefill_s']['median']:.3g} s | {r['illava']['prefill_s']:.2f}x | "
        f"{s['illava']['flops_predicted_prefill_speedup']:.2f}x | "
        f"{100 * s['illava']['prefill_speedup_share_of_predicted']:.0f}% | {r['illava']['encoder_s']:.2f}x | "
        f"{r['illava']['samples_per_s']:.2f}x | {r['illava']['decode_tokens_per_s']:.2f}x | "
        f"{r['illava']['peak_memory_mb']:.2f}x | {r['disabled']['prefill_s']:.3f} |"
    )


HEADER = (
    "| architecture | device | dtype | preset | visual tokens (stock -> encoder -> LLM) | stock prefill | "
    "prefill gain | FLOPs-predicted | share of predicted | encoder gain | end-to-end gain | decode gain | "
    "memory gain | stock/disabled prefill |\n|" + "---|" * 14
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write all reports (JSON) here")
    parser.add_argument(
        "--sweep", default="1.5", help="extra reduction levels relative to the preset (comma-separated; '' for none)"
    )
    args = parser.parse_args()
    reports, rows = [], []
    for arch, preset, video, dtype in CASES[args.device]:
        model, name = bench.load_model(None, arch, dtype, args.device)
        model.set_attn_implementation("sdpa")
        images = [] if video else [bench.default_image()]
        clips = [bench.default_video(8)] if video else []
        inputs = bench.make_inputs(model, None, images, clips, 1)
        report = bench.run_bench(
            model,
            name,
            inputs,
            preset,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            sweep=[float(v) for v in args.sweep.split(",") if v.strip()],
            progress=lambda s: print(".", end="", flush=True),
        )
        print()
        reports.append(report)
        rows.append(row(report, preset + (" (8 frames)" if video else "")))
        print(HEADER, *rows, sep="\n", flush=True)
        for level in [n for n in report["settings"] if n.startswith("level ")]:
            st, rt = report["settings"][level], report["ratios"][level]
            v = st["visual_tokens"]
            print(
                f"  {preset} at {level}: visual tokens {v['stock']} -> {v['after_encoder']} -> {v['after_llm']}, "
                f"prefill gain {rt['prefill_s']:.2f}x, FLOPs-predicted {st['flops_predicted_prefill_speedup']:.2f}x, "
                f"end-to-end gain {rt['samples_per_s']:.2f}x",
                flush=True,
            )
        del model
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
