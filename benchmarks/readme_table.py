"""Produce the results table of docs/results.md (the README quotes its headline row): stock vs
patched-but-disabled vs iLLaVA, alternated.

CPU rows: LLaVA-OneVision-0.5B architecture (random weights), fp32, one 384x384 image, `image`
preset. With a CUDA device (--device cuda): bf16, SDPA, 7B architectures.

    python benchmarks/readme_table.py --device cpu --out benchmarks/results/cpu.json

--from-json turns the JSON of benchmarks/gpu.py (benchmarks/gpu.sh) into the GPU table rows of
docs/results.md and notes, without measuring anything:

    python benchmarks/readme_table.py --from-json out/gpu/gpu.json
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


GPU_HEADER = (
    "| architecture | GPU | dtype | preset | visual tokens (stock -> encoder -> LLM) | stock prefill | "
    "prefill gain (pair median / min) | FLOPs-predicted | encoder gain | end-to-end gain | decode gain | "
    "memory gain | throughput gain at equal memory |\n|" + "---|" * 13
)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def gpu_row(entry: dict, throughput: dict | None = None) -> str:
    """One table row of a run_bench row of benchmarks/gpu.py: gains of iLLaVA over stock as the median of
    the ratios of adjacent runs (prefill: also the ratio of the best runs); the absolute stock prefill
    only on a GPU; the throughput gain when ``throughput`` (the throughput row) measured the same case."""
    gains, tokens = entry["gains"]["illava"], entry["visual_tokens"]["illava"]
    settings = entry["report"]["settings"]
    stock_prefill = settings["stock"]["metrics"]["prefill_s"]["median"]
    absolute = f"{1000 * stock_prefill:.0f} ms" if entry["device"] != "cpu" else "-"
    pair = {metric: _x(gains.get(metric, {}).get("pair_median")) for metric in bench.METRICS}
    prefill = f"{pair['prefill_s']} / {_x(gains.get('prefill_s', {}).get('min_ratio'))}"
    predicted = _x(settings["illava"]["flops_predicted_prefill_speedup"])
    more = "-"
    if throughput is not None and "gain" in throughput:
        batches = f"batch {throughput['settings']['stock']['batch']} -> {throughput['settings']['illava']['batch']}"
        more = f"{_x(throughput['gain']['pair_median'])} ({batches})"
    return (
        f"| {entry['architecture']} | {entry['device']} | {entry['dtype']} | {entry['preset']}, {entry['media']} | "
        f"{tokens['stock']} -> {tokens['after_encoder']} -> {tokens['after_llm']} | {absolute} | {prefill} | "
        f"{predicted} | {pair['encoder_s']} | {pair['samples_per_s']} | "
        f"{pair['decode_tokens_per_s']} | {pair['peak_memory_mb']} | {more} |"
    )


def gpu_notes(rows: list[dict]) -> list[str]:
    """Lines under the table: throughput details, the cost of an encoder merge layer, rows not measured."""
    notes = []
    for entry in rows:
        if entry["status"] != "ok":
            notes.append(f"- not measured: row {entry['row']} ({entry['name']}): {entry['status']}, {entry['reason']}")
        elif "memory_cap_mb" in entry:
            parts = [
                f"{name} batch {found['batch']}"
                + (f", {found['samples_per_s']['median']:.3g} samples/s" if "samples_per_s" in found else "")
                for name, found in entry["settings"].items()
            ]
            cap = entry["memory_cap_mb"]
            cap_text = f"{cap / 1024:.3g} GiB" if cap >= 1024 else f"{cap:.3g} MB"
            notes.append(
                f"- throughput at equal memory ({entry['architecture']}, {entry['media']}, cap {cap_text} of peak "
                "memory of `generate`): " + "; ".join(parts)
            )
        elif "layers" in entry:
            for layer in entry["layers"]:
                if "error" in layer:
                    notes.append(f"- encoder merge layer, {layer['architecture']}: {layer['error']}")
                    continue
                cost, attention = layer["layer_cost_ratio"], layer["attention_cost_ratio"]
                notes.append(
                    f"- encoder merge layer {layer['layer']} of {layer['architecture']} ({layer['crops']} crops x "
                    f"{layer['tokens_per_crop']} tokens, {entry['device']}): time iLLaVA / stock "
                    f"{_x(cost['pair_median'])} (min {_x(cost['min_ratio'])}); attention alone, scoring "
                    f"softmax / SDPA {_x(attention['pair_median'])} (min {_x(attention['min_ratio'])})"
                )
    return notes


def gpu_table(rows: list[dict]) -> list[str]:
    """The GPU table of docs/results.md (header, one row per run_bench row) and the notes under it."""
    throughput = next((r for r in rows if r["status"] == "ok" and "memory_cap_mb" in r), None)
    lines = [GPU_HEADER]
    for entry in rows:
        if entry["status"] == "ok" and "report" in entry:
            same = throughput is not None and all(
                throughput[key] == entry[key] for key in ("architecture", "preset", "media")
            )
            lines.append(gpu_row(entry, throughput if same else None))
    notes = gpu_notes(rows)
    return lines + ([""] + notes if notes else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", type=Path, help="print the table of this benchmarks/gpu.py JSON and exit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write all reports (JSON) here")
    parser.add_argument(
        "--sweep", default="1.5", help="extra reduction levels relative to the preset (comma-separated; '' for none)"
    )
    args = parser.parse_args()
    if args.from_json:
        print(*gpu_table(json.loads(args.from_json.read_text())), sep="\n")
        return
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
