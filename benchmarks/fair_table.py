"""The per-budget tables of issues 38 and 39 (docs/results.md), from the JSON of

    illava eval easy-vqa --model real --methods all --budgets 0.5,0.33,0.2,0.1 --limit 300 --open-only \
        --dtype bfloat16 --json benchmarks/results/real_easy_vqa_fair.json
    python benchmarks/fair_table.py benchmarks/results/real_easy_vqa_fair.json

    illava eval scenes --methods all --budgets 0.5 --limit 300 --json scenes_50.json   # one run per budget
    python benchmarks/fair_table.py scenes_50.json scenes_33.json ... --kinds         # merged, per kind too

Several JSON files of one task and question set are merged (stock from the first; each budget from
the file that measured it).

One row per method, one column per budget: open-question accuracy with its standard error
(sqrt(p (1 - p) / n)), the achieved FLOPs share where the method cannot reach the budget ("floor"),
then agreement with stock and the KL of the first answer token at each budget.
"""

from __future__ import annotations

import argparse
import json
import math


def merged(reports: list[dict]) -> dict:
    """One report from runs of one task over the same questions at different budgets."""
    first = dict(reports[0])
    for other in reports[1:]:
        if other.get("task") != first.get("task") or other["questions"] != first["questions"]:
            raise SystemExit("fair_table: the files hold different tasks or question sets")
    budgets = sorted({b for r in reports for b in r["budgets"]}, reverse=True)
    scores = [first["scores"][0]]
    for budget in budgets:
        for r in reports:
            if budget in r["budgets"]:
                scores += [s for s in r["scores"][1:] if s["target"] == budget]
                break
    first["budgets"], first["scores"] = budgets, scores
    return first


def questions(report: dict) -> int:
    q = report["questions"]
    return q["open"] if isinstance(q, dict) else q


def kinds_table(report: dict, budget: float) -> list[str]:
    """Per-kind accuracy ± standard error of every method at one budget (the scenes task)."""
    counts = {k: n for k, n in report["per_kind"].items() if n}
    kinds = list(counts)
    head = "| method | FLOPs share | all | " + " | ".join(f"{k} ({counts[k]})" for k in kinds) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(kinds)]
    n = questions(report)

    def cell(p: float, m: int) -> str:
        return f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / m):.1f}"

    chance = report.get("chance", {})
    lines.append("| chance | | | " + " | ".join(f"{100 * chance.get(k, 0):.1f}" for k in kinds) + " |")
    for s in report["scores"]:
        if s["method"] != "stock" and s["target"] != budget:
            continue
        share = f"{100 * s['share']:.0f}%" + ("" if s["reached"] else " (floor)")
        row = [f"`{s['method']}`" if s["method"] != "stock" else "stock", share, cell(s["accuracy"], n)]
        row += [cell(s["kinds"][k], counts[k]) for k in kinds]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table(report: dict, field: str | None = None) -> list[str]:
    field = field or ("accuracy_open" if isinstance(report["questions"], dict) else "accuracy")
    n = questions(report)
    budgets = report["budgets"]
    scores = report["scores"]
    stock = scores[0]
    by_method: dict[str, dict[float, dict]] = {}
    for s in scores[1:]:
        by_method.setdefault(s["method"], {})[s["target"]] = s

    def cell(s: dict | None) -> str:
        if s is None:
            return "-"
        p = s[field]
        text = f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / n):.1f}"
        if not s["reached"]:
            text += f" (floor {100 * s['share']:.0f}%)"
        return text

    head = "| method | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " | agreement | KL (nats) |"
    lines = [head, "|---|" + "---|" * (len(budgets) + 2)]
    lines.append(f"| stock | {cell(stock)} (100%) |" + " |" * (len(budgets) - 1) + " 100% | 0 |")
    for method, at in by_method.items():
        cells = [cell(at.get(b)) for b in budgets]
        agree = " / ".join(f"{100 * at[b]['agreement']:.0f}" for b in budgets if b in at)
        kl = " / ".join(f"{at[b]['kl']:.3f}" for b in budgets if b in at)
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {agree} | {kl} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON files of illava eval easy-vqa / scenes")
    parser.add_argument("--kinds", action="store_true", help="also a per-kind table at every budget (scenes)")
    args = parser.parse_args()
    report = merged([json.loads(open(path).read()) for path in args.reports])
    print(f"{questions(report)} questions; budgets {report['budgets']}\n")
    print("\n".join(table(report)))
    if args.kinds and "per_kind" in report:
        for budget in report["budgets"]:
            print(f"\n{100 * budget:g}% of stock prefill FLOPs, accuracy per kind:\n")
            print("\n".join(kinds_table(report, budget)))


if __name__ == "__main__":
    main()
