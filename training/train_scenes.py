"""Train the real-weights LLaVA on the scenes task (``illava_tasks.scenes``, issue 39), on the CPU.

    python training/train_scenes.py --stop-after 300 --out /tmp/s300  # the shipped recipe, in two runs as it
    python training/train_scenes.py --resume /tmp/s300 --start-step 300  #   was made (2 idle cores, ~55 min)
    python training/train_scenes.py --steps 20 --scenes 64 --out /tmp/s --eval 40   # a quick try

The same parts and the same stock ``LlavaForConditionalGeneration`` as ``training/train_real.py``
(DINOv2-S/14 frozen, a 2-layer GELU projector and rank-8 LoRA adapters of SmolLM2-135M-Instruct
trained here), on scenes of 2 to 6 objects with count, attribute, relation, presence and
smallest-object questions. Merging is training-free: the model is trained stock.

1. ``--scenes`` training scenes (``scenes.train_split``'s seed stream, never the test scenes) are
   drawn; the frozen tower's features (last layer, CLS dropped: 256 x 384) are computed once and cached
   (``--cache``, float16; not in the repository).
2. Warm start (``--warm``, default on): the projector and the LoRA adapters start from the shipped
   easy-VQA model's (``illava_tasks/models/real-easy-vqa``), which already names shapes and colours.
3. Each step takes ``--batch`` scenes and asks up to ``--turns`` of each scene's questions
   (``scenes.training_questions``: several draws of the question rules) as successive turns of one
   conversation, in random order (the evaluation asks one question as the first turn); next-token
   loss on every answer and its end token (``train_real.batch_loss``: bfloat16 autocast for the
   decoder; projector, adapters and AdamW in float32).
   ``--aux``: two linear heads on every projected token predict the colour and the shape of the
   object under its patch (``scenes.patch_labels``; background is a class), which teaches the
   projector to keep each patch's colour and shape apart (DINOv2 holds colour in directions of small
   variance); the heads are dropped after training.
4. The projector and adapters are saved as in ``train_real.py`` (``projector.safetensors``,
   ``lora.safetensors``, ``training.json``); accuracy per kind on ``--eval`` test questions is measured
   on the saved files as users load them (``real.load``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_real import batch_loss  # noqa: E402

from illava.tools import realparts  # noqa: E402
from illava_tasks import real, scenes  # noqa: E402

MODEL_DIR = Path(__file__).parent.parent / "illava_tasks" / "models" / "real-scenes"


def features(model, processor, chosen: list[scenes.Scene], cache: Path) -> torch.Tensor:
    """(len(chosen), 256, 384) float16: the frozen tower's features of each scene, cached on disk."""
    key = hash(tuple(s.seed for s in chosen)) & 0xFFFFFFFF
    file = cache / f"scenes_dinov2s224_{len(chosen)}_{key:08x}.pt"
    if file.exists():
        return torch.load(file)
    tower = model.model.vision_tower
    out = []
    start = time.time()
    with torch.inference_mode():
        for n in range(0, len(chosen), 16):
            images = [s.image() for s in chosen[n : n + 16]]
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            out.append(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:].half())
            if n % 320 == 0:
                print(f"  features {n + len(images)}/{len(chosen)} ({time.time() - start:.0f} s)", flush=True)
    feats = torch.cat(out)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(feats, file)
    return feats


def conversation(tokenizer, qas: list[tuple[str, str, str]], image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of one scene's questions as successive turns, and labels (-100 but on the answers and
    their end tokens). The first turn is ``scenes.prompt`` with the image's placeholders."""
    ids: list[int] = []
    labels: list[int] = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for n, (_, question, answer) in enumerate(qas):
        if n == 0:
            text = scenes.prompt(question).replace("<image>", realparts.IMAGE_TOKEN * image_tokens)
        else:
            text = f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        part = tokenizer(text, add_special_tokens=False).input_ids
        reply = tokenizer(answer, add_special_tokens=False).input_ids + [end]
        ids += part + reply
        labels += [-100] * len(part) + reply
    return ids, labels


def evaluate(folder: Path, questions: int) -> dict:
    """Accuracy per kind on the first ``questions`` of the test split, of the saved files."""
    model, tokenizer, image_processor = real.load(folder)
    rows = scenes.test_split()[:questions]
    t = time.time()
    ok = scenes.correct(tokenizer, rows, scenes.predict(model, tokenizer, image_processor, rows))
    kinds = {k: round(v, 4) for k, v in scenes.by_kind(rows, ok).items()}
    return {
        "questions": len(rows),
        "accuracy": round(ok.float().mean().item(), 4),
        "kinds": kinds,
        "s": round(time.time() - t),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/illava-real-cache"))
    parser.add_argument("--scenes", type=int, default=2000, help="training scenes")
    parser.add_argument("--draws", type=int, default=4, help="draws of the question rules per training scene")
    parser.add_argument("--steps", type=int, default=600, help="length of the learning-rate schedule")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--stop-after", type=int, default=0, help="stop after so many steps of the schedule (0: run it all)"
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the projector and the adapters from the shipped easy-VQA model's",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="start the projector and adapters from this folder's (a checkpoint of this script) instead",
    )
    parser.add_argument(
        "--start-step", type=int, default=0, help="with --resume: the schedule's step to go on from (fresh AdamW)"
    )
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the per-patch colour and shape heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=300, help="test questions scored at the end")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=50)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    begin = time.time()

    start_from = args.resume or (real.MODEL_DIR if args.warm else None)
    warm = real.load_projector(start_from) if start_from is not None else None
    model, tokenizer, processor = realparts.assemble(warm, seed=args.seed)
    image_id = model.config.image_token_index
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lora = None
    if args.lora_rank:
        lora = real.Lora(model.model.language_model, args.lora_rank, args.lora_alpha)
        if start_from is not None:
            tensors, scale = real.load_lora(start_from)
            if abs(scale - lora.scale) > 1e-9:
                raise SystemExit(f"--warm needs the easy-VQA adapters' scale {scale}, got alpha/rank {lora.scale}")
            with torch.no_grad():
                for n, name in enumerate(lora.names):
                    lora.a[n].copy_(tensors[f"{name}.lora_A"].float())
                    lora.b[n].copy_(tensors[f"{name}.lora_B"].float())
        print(
            f"LoRA rank {args.lora_rank} on {len(lora.names)} layers" + (f" (from {start_from})" if start_from else "")
        )
    print(f"assembled in {time.time() - begin:.0f} s", flush=True)

    train = {}
    seed = scenes.TRAIN_SEED * 100_000
    while len(train) < args.scenes:
        train[seed] = scenes.scene(seed)
        seed += 1
    chosen = list(train.values())
    test_seeds = {s.seed for s, _, _, _ in scenes.test_split()}
    assert not test_seeds & set(train), "training scenes overlap the test split"
    qas = [scenes.training_questions(s, args.draws) for s in chosen]
    print(f"{len(chosen)} training scenes, {sum(map(len, qas))} questions", flush=True)
    t = time.time()
    feats = features(model, processor.image_processor, chosen, args.cache)
    feature_seconds = time.time() - t
    print(f"features: {tuple(feats.shape)}, {feature_seconds:.0f} s", flush=True)
    tokens = feats.shape[1]

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        real.save_projector(real.folded_projector(projector, None, None), args.out)
        if lora is not None:
            real.save_lora(lora.tensors(), lora.scale, args.out)

    heads = None
    if args.aux:
        width = model.config.text_config.hidden_size
        heads = torch.nn.ModuleList(
            [torch.nn.Linear(width, 1 + len(scenes.COLOURS)), torch.nn.Linear(width, 1 + len(scenes.SHAPES))]
        )
        patch = torch.tensor([scenes.patch_labels(s) for s in chosen])  # (scenes, 2, 256)
        print(f"per-patch heads: {(patch[:, 0] > 0).float().mean():.1%} of patches lie on an object")
    groups = [{"params": list(projector.parameters()), "lr": args.lr, "base": args.lr}]
    if heads is not None:
        groups.append({"params": list(heads.parameters()), "lr": args.lr, "base": args.lr})
    if lora is not None:
        groups.append({"params": list(lora.parameters()), "lr": args.lora_lr, "base": args.lora_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trained = [p for g in groups for p in g["params"]]
    order: list[int] = []
    log = []
    running = None
    t = time.time()
    model.train()
    last = min(args.steps, args.stop_after or args.steps)
    for step in range(args.start_step, last):
        ramp = min(1.0, (step - args.start_step + 1) / args.warmup)  # a resumed run's AdamW starts afresh
        factor = ramp * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * factor
        if len(order) < args.batch:
            order += random.sample(range(len(chosen)), len(chosen))
        picked, order = order[: args.batch], order[args.batch :]
        convs = []
        for n in picked:
            turns = list(qas[n])
            random.shuffle(turns)
            convs.append(conversation(tokenizer, turns[: args.turns], tokens))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, projected = batch_loss(model, feats[picked].float(), convs, image_id)
        lm_loss = loss.item()
        if heads is not None:
            flat = projected.float().reshape(-1, projected.shape[-1])
            for head, target in zip(heads, patch[picked].transpose(0, 1)):
                loss = loss + args.aux * torch.nn.functional.cross_entropy(head(flat), target.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        running = lm_loss if running is None else 0.9 * running + 0.1 * lm_loss
        if step % args.log_every == 0 or step == last - 1:
            elapsed = time.time() - t
            now = {"step": step, "loss": round(lm_loss, 4), "smoothed": round(running, 4), "s": round(elapsed)}
            if heads is not None:
                now["aux"] = round(loss.item() - lm_loss, 4)
            log.append(now)
            extra = f"  aux {now['aux']:.4f}" if heads is not None else ""
            print(
                f"step {step:4d}  loss {lm_loss:.4f}  smoothed {running:.4f}{extra}  lr x{factor:.2f}  {elapsed:.0f} s"
            )
        if args.save_every and (step + 1) % args.save_every == 0:
            save()
    train_seconds = time.time() - t
    model.eval()
    save()
    result = {}
    if args.eval:
        del model
        result = evaluate(args.out, args.eval)
        print(f"test accuracy: {result}", flush=True)
    record = {
        "script": "training/train_scenes.py",
        "recipe": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "cache")},
        "trained": f"multi_modal_projector; LoRA rank {args.lora_rank} (alpha {args.lora_alpha}) on "
        f"{', '.join(realparts.LORA_TARGETS)}; tower frozen" + ("; warm start from real-easy-vqa" if args.warm else ""),
        "scenes": len(chosen),
        "questions": sum(map(len, qas)),
        "feature_seconds": round(feature_seconds),
        "train_seconds": round(train_seconds),
        "torch_threads": args.threads,
        "loss_first": log[0]["smoothed"] if log else None,
        "loss_last": log[-1]["smoothed"] if log else None,
        "log": log,
        "eval_during_training": result,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {args.out} (total {time.time() - begin:.0f} s)")


if __name__ == "__main__":
    main()
