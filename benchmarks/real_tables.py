"""The real-weights tables of docs/results.md, from the JSON of `illava eval easy-vqa --model real`
(settings: stock, presets, recycle modes, sweep, inverted scorer) and of the same with `--methods all`.

    python benchmarks/real_tables.py --settings benchmarks/results/real_easy_vqa.json \
        --methods benchmarks/results/real_easy_vqa_methods.json

Per question kind (open: the answer names a shape or a colour; present / absent: yes/no questions
about what the image does or does not show), and for each method the smallest FLOPs share among the
measured budgets at which it keeps at least 99% of stock accuracy (all kinds and open questions).
"""

from __future__ import annotations

import argparse
import json
import math

from methods_table import method_groups  # benchmarks/ is the script's folder

KINDS = ("open", "present", "absent")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def settings_rows(scores: list[dict]) -> list[str]:
    stock = scores[0]
    lines = [
        "| setting | visual tokens (in -> encoder -> LLM) | prefill GFLOPs | FLOPs cut | accuracy | "
        + " | ".join(KINDS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(KINDS),
    ]
    for s in scores:
        v, kinds = s["visual_tokens"], s.get("kinds") or {}
        lines.append(
            f"| {s['setting']} | {v['stock']} -> {v['after_encoder']} -> {v['after_llm']} | {s['gflops']:.2f} | "
            f"{stock['gflops'] / s['gflops']:.2f}x | {_pct(s['accuracy'])} | "
            + " | ".join(_pct(kinds.get(k)) for k in KINDS)
            + " |"
        )
    return lines


def methods_rows(report: dict) -> list[str]:
    lines = [
        "| method | budgets | achieved FLOPs share | visual tokens (stock -> encoder -> LLM) | accuracy, all-kinds "
        "subset | open (all rows) | present (all rows) | absent (all rows) | agreement | KL (nats) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, scores, budgets, floor in method_groups(report):
        first = scores[0]
        v, kinds = first["visual_tokens"], first.get("kinds") or {}
        lines.append(
            f"| {method} | {budgets} | {100 * first['share']:.1f}%{floor} | {v['stock']} -> {v['after_encoder']} -> "
            f"{v['after_llm']} | {_pct(first['accuracy_all'])} | "
            + " | ".join(_pct(kinds.get(k)) for k in KINDS)
            + f" | {_pct(first['agreement'])} | {first['kl']:.4f} |"
        )
    return lines


def keeps_99(report: dict) -> list[str]:
    """Per method: the smallest achieved FLOPs share (of the budgets measured) whose accuracy is at
    least 99% of stock's, on all kinds and on open questions."""
    scores = report["scores"]
    stock = next(s for s in scores if s["method"] == "stock")
    n_all, n_open = report["questions"]["all"], report["questions"]["open"]
    lines = [
        "| method | smallest FLOPs share keeping >= 99% of stock, all kinds | same, open questions |",
        "|---|---|---|",
    ]
    for method in dict.fromkeys(s["method"] for s in scores if s["method"] != "stock"):
        cells = []
        for key in ("accuracy_all", "accuracy_open"):
            ok = [s["share"] for s in scores if s["method"] == method and s[key] >= 0.99 * stock[key]]
            cells.append(f"{100 * min(ok):.1f}%" if ok else "none of the budgets")
        lines.append(f"| {method} | {cells[0]} | {cells[1]} |")
    se_all = math.sqrt(stock["accuracy_all"] * (1 - stock["accuracy_all"]) / n_all)
    se_open = math.sqrt(stock["accuracy_open"] * (1 - stock["accuracy_open"]) / n_open)
    lines.append("")
    lines.append(
        f"Stock: {_pct(stock['accuracy_all'])} of {n_all} questions of all kinds (standard error "
        f"{100 * se_all:.1f} points), {_pct(stock['accuracy_open'])} of {n_open} open ones ({100 * se_open:.1f} "
        f"points); one question is {100 / n_all:.1f} / {100 / n_open:.1f} points, so 99% of stock means no "
        "more than about one question lost."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings")
    parser.add_argument("--methods")
    args = parser.parse_args()
    if args.settings:
        with open(args.settings) as f:
            print("\n".join(settings_rows(json.load(f))), end="\n\n")
    if args.methods:
        with open(args.methods) as f:
            report = json.load(f)
        print("\n".join(methods_rows(report)), end="\n\n")
        print("\n".join(keeps_99(report)))


if __name__ == "__main__":
    main()
