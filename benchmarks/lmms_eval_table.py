"""Markdown table of the runs written by ``benchmarks/paper_lmms_eval.sh``: per benchmark the
baseline and iLLaVA rows with every metric lmms-eval reported, prefill time, throughput and the
visual tokens per stage.

    python benchmarks/lmms_eval_table.py runs/paper
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path):
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        results = sorted(run.rglob("*_results.json"))
        timing = run / "timing.json"
        if not results:
            continue
        data = json.loads(results[-1].read_text())["results"]
        t = json.loads(timing.read_text()) if timing.exists() else {}
        for task, metrics in data.items():
            scores = {
                k.split(",")[0]: v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"
            }
            yield run.name, task, scores, t


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/paper")
    print("| run | task | metrics | prefill s / batch | samples/s | visual tokens (stock -> encoder -> LLM) |")
    print("|---|---|---|---|---|---|")
    for name, task, scores, t in rows(root):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        tokens = t.get("visual_tokens")
        tok = "stock"
        if tokens:
            tok = f"{tokens['stock']:.0f} -> {tokens['after_encoder']:.0f} -> {tokens['after_llm']:.0f}"
        prefill = t.get("prefill_seconds_per_batch")
        speed = t.get("samples_per_s")
        print(
            f"| {name} | {task} | {metrics} | {prefill:.3g} | {speed:.3g} | {tok} |"
            if prefill and speed
            else f"| {name} | {task} | {metrics} | - | - | {tok} |"
        )


if __name__ == "__main__":
    main()
