"""The received-attention lift per encoder layer of a tower, and the layers the rule picks (issue 38).

    python benchmarks/layer_profile.py                       # the real DINOv2-S/14 of the real-weights LLaVA
    python benchmarks/layer_profile.py --arch tiny-llava     # a bundled architecture (random weights)

Writes a Markdown table (stdout), ``--json`` and ``--plot`` (lift per layer, the rule's level and its
layers, and the layers the ``image`` preset scales to). On random weights the statistic says nothing
about where informative tokens are: the published towers (SigLIP of LLaVA-OneVision, Qwen2-VL's ViT)
cannot be checked here, since no trained weights of them can be loaded on this machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import illava
from illava.tools import schedule


def load(arch: str | None):
    if arch is None:
        from illava_tasks import real

        return real.load()
    from illava.tools.architectures import tiny_config
    from illava.tools.inputs import word_tokenizer

    config = tiny_config(arch)
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval(), word_tokenizer(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", help="a tiny architecture of illava.tools.architectures (default: the real DINOv2-S)")
    parser.add_argument("--count", type=int, default=4, help="merge layers of the schedule (the image preset's: 4)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer, processor = load(args.arch)
    profile = schedule.measure(model, tokenizer, processor)
    chosen = schedule.choose_layers(profile, args.count)
    preset = illava.configure(model, "image").encoder_layers
    print(f"| layer | {' | '.join(str(layer) for layer in profile.layers)} |")
    print(f"|---|{'---|' * len(profile.layers)}")
    print(f"| lift | {' | '.join(f'{value:.2f}' for value in profile.lift)} |")
    print(f"\nrule ({args.count} layers): {chosen}; image preset (depth-scaled): {preset}; {profile.images} photos")
    report = {"arch": args.arch or "real DINOv2-S/14", "profile": profile.table(), "rule": chosen, "preset": preset}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=120)
        ax.plot(profile.layers, profile.lift, "o-", color="black", label="received-attention lift (top 10%)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        for layer in chosen:
            ax.axvspan(layer - 0.4, layer + 0.4, color="tab:green", alpha=0.25)
        for layer in preset:
            ax.plot([layer], [0.9], "v", color="tab:red")
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("lift (1 = flat)")
        ax.set_title(f"{report['arch']}: green = the rule's layers, red = the image preset's", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
