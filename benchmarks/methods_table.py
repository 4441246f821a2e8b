"""The method-comparison tables of docs/results.md, from the JSON of `illava eval easy-vqa --methods`
and of `illava bench --method all --budget S` (one or more).

    python benchmarks/methods_table.py --eval benchmarks/results/easy_vqa_methods.json \
        --bench benchmarks/results/methods-cpu-0.5b-33.json benchmarks/results/methods-cpu-0.5b-10.json

Budgets a method cannot reach give the same configuration (its most reducing one): they share a row.
"""

from __future__ import annotations

import argparse
import json


def method_groups(report: dict):
    """(method, its scores, the budgets cell, the floor mark) per row: budgets a method cannot
    reach give the same configuration and share a row."""
    groups: dict[tuple, list[dict]] = {}
    for s in report["scores"]:
        groups.setdefault((s["method"], s["config"]), []).append(s)
    for (method, _), scores in groups.items():
        budgets = ", ".join(f"{100 * s['target']:g}%" for s in scores) if method != "stock" else "-"
        floor = "" if all(s["reached"] for s in scores) else " (floor)"
        yield method, scores, budgets, floor


def eval_rows(report: dict) -> list[str]:
    lines = [
        "| method | budgets (FLOPs share) | achieved | visual tokens (stock -> encoder -> LLM) | accuracy, all | "
        "accuracy, open | agreement with stock | KL from stock (nats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, scores, budgets, floor in method_groups(report):
        first = scores[0]
        v = first["visual_tokens"]
        lines.append(
            f"| {method} | {budgets} | {100 * first['share']:.1f}%{floor} | {v['stock']} -> {v['after_encoder']} -> "
            f"{v['after_llm']} | {100 * first['accuracy_all']:.1f}% | {100 * first['accuracy_open']:.1f}% | "
            f"{100 * first['agreement']:.1f}% | {first['kl']:.4f} |"
        )
    return lines


def bench_rows(reports: list[dict]) -> list[str]:
    lines = [
        "| method | budget | achieved | visual tokens (stock -> encoder -> LLM) | predicted prefill speedup | "
        "measured (pair median; fastest runs) | share of predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for method, row in report["methods"].items():
            v, m = row["visual_tokens"], row["prefill_speedup"]
            floor = "" if row["budget_reached"] in (None, True) else " (floor)"
            lines.append(
                f"| {method} | {100 * report['budget']:g}% | {100 * row['flops_share']:.1f}%{floor} | {v['stock']} -> "
                f"{v['after_encoder']} -> {v['after_llm']} | {row['flops_predicted_prefill_speedup']:.2f}x | "
                f"{m['pair_median']:.2f}x ({m['min_ratio']:.2f}x) | {100 * row['share_of_predicted']:.0f}% |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", help="JSON of illava eval easy-vqa --methods")
    parser.add_argument("--bench", nargs="*", default=[], help="JSONs of illava bench --method all --budget S")
    args = parser.parse_args()
    if args.eval:
        with open(args.eval) as f:
            print("\n".join(eval_rows(json.load(f))))
        print()
    if args.bench:
        reports = []
        for path in args.bench:
            with open(path) as f:
                reports.append(json.load(f))
        print("\n".join(bench_rows(reports)))


if __name__ == "__main__":
    main()
