"""The per-budget tables of issue 38 (docs/results.md), from the JSON of

    illava eval easy-vqa --model real --methods all --budgets 0.5,0.33,0.2,0.1 --limit 300 --open-only \
        --dtype bfloat16 --json benchmarks/results/real_easy_vqa_fair.json
    python benchmarks/fair_table.py benchmarks/results/real_easy_vqa_fair.json

One row per method, one column per budget: open-question accuracy with its standard error
(sqrt(p (1 - p) / n)), the achieved FLOPs share where the method cannot reach the budget ("floor"),
then agreement with stock and the KL of the first answer token at each budget.
"""

from __future__ import annotations

import argparse
import json
import math


def table(report: dict, field: str = "accuracy_open") -> list[str]:
    n = report["questions"]["open"]
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
    parser.add_argument("report")
    args = parser.parse_args()
    report = json.loads(open(args.report).read())
    print(f"{report['questions']['open']} open questions; budgets {report['budgets']}\n")
    print("\n".join(table(report)))


if __name__ == "__main__":
    main()
