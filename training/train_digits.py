"""Train the digits model: a small LLaVA-OneVision that reads handwritten digits, on the CPU, fixed seed.

STATUS: this recipe does not learn yet, and no digits model is shipped. Measured on 2 CPU cores
(2026-12-01): stage 1 as first written (a digit-or-background label for every patch, 400 steps)
reached 40% of digit patches right, and stage 2 then stayed at chance for 300 steps (position 8%,
read 0%, video order 4%; count questions at the prior); stage 1 as below (cells and frames, 400 of
1,000 steps at lr 3e-3) stayed at the empty-cell prior (53%) and chance on frames (10-20%). A
SigLIP of width 128 trained from scratch on 4 px patches learns 10-way digit classification of
whole 48 px frames very slowly (23% after 80 steps of 60 frames at lr 1e-3): a vision transformer
without convolutions needs far more samples than the 2-core budget gives. Next: larger patches,
a patch embedding initialised from the digits' principal components, or distillation from a small
CNN trained first on the 8x8 digits.

    python training/train_digits.py                                   # the shipped model
    python training/train_digits.py --vision-steps 50 --steps 50 --out /tmp/d   # a quick try

Data (``illava/tools/digits.py``): scenes of 3-6 handwritten digits (scikit-learn's, train split) on a
96 px canvas seen through AnyRes crops, and 6-frame clips of one digit per frame; questions about
position, count, neighbours, reading a row, order and count over frames. Fresh scenes every step
from a seeded generator (the weights depend on the seed and the step counts, not on machine speed).

Two stages:

1. the vision tower alone learns which digit each grid cell holds (or that it is empty), from the
   mean of its output tokens over that cell in every view (base view, crops), and the digit of each
   video frame: a linear classifier, thrown away after;
2. the whole model learns to answer: next-token loss on every answer and its end token; each row
   is one scene (or clip) with up to ``--turns`` of its questions as successive turns of one
   conversation; AdamW with warm-up and cosine decay, the vision tower at ``--vision-lr-scale``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from illava.tools import digits as D
from illava.tools.inputs import build


def cell_targets(scene: D.Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """For the base view and the four crops (the image processor's order): the grid cell under the
    centre of every patch ``(5, 144)``, and the digit of every cell (10: empty) ``(9,)``."""
    side = D.CROP // D.PATCH
    centres = np.arange(side)
    step = D.CANVAS // side  # 8 px of the canvas per base-view patch
    views = [np.ix_(centres * step + step // 2, centres * step + step // 2)]
    for a in range(2):
        for b in range(2):
            ys = a * D.CROP + centres * D.PATCH + D.PATCH // 2
            xs = b * D.CROP + centres * D.PATCH + D.PATCH // 2
            views.append(np.ix_(ys, xs))
    rows, cols = np.meshgrid(np.arange(D.CANVAS) // D.CELL, np.arange(D.CANVAS) // D.CELL, indexing="ij")
    cell_of_pixel = rows * 3 + cols
    cells = np.stack([cell_of_pixel[v].reshape(-1) for v in views])
    digits = torch.full((9,), 10)
    for (r, c), d in scene.cells.items():
        digits[r * 3 + c] = d
    return torch.from_numpy(cells), digits


def pretrain_vision(model, processor, pool, rng, steps: int, lr: float, batch: int) -> list[dict]:
    """Stage 1: the vision tower alone learns which digit each grid cell holds (or that it is empty),
    from the mean of its output tokens over the patches of that cell, in every view (base view and
    the crops that show part of the cell), and which digit each video frame shows. The classifier
    (layer norm + linear) is thrown away afterwards."""
    vision = model.model.vision_tower
    width = vision.config.hidden_size
    norm, head = torch.nn.LayerNorm(width), torch.nn.Linear(width, 11)
    params = [*vision.parameters(), *norm.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    start, log = time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        scenes = [D.make_scene(rng, pool) for _ in range(batch)]
        pix = processor([s.image for s in scenes], return_tensors="pt")["pixel_values"].flatten(0, 1)
        targets = [cell_targets(s) for s in scenes]
        cells = torch.cat([c for c, _ in targets])  # (views, 144)
        digits = torch.stack([d for _, d in targets]).repeat_interleave(5, 0)  # (views, 9)
        clips = [D.make_clip(rng, pool) for _ in range(max(1, batch // 4))]
        frames = torch.cat([video_pixels(c.frames, processor) for c in clips])
        frame_digits = torch.tensor([d for c in clips for d in c.digits])
        hidden = vision(pixel_values=torch.cat([pix, frames]), output_hidden_states=True).hidden_states[-1]
        member = torch.nn.functional.one_hot(cells, 9).float()  # (views, 144, 9)
        count = member.sum(1)  # (views, 9)
        pooled = torch.einsum("vtc,vtd->vcd", member, hidden[: len(pix)]) / count.clamp(min=1)[..., None]
        cell_labels = torch.where(count > 0, digits, torch.full_like(digits, -100))
        cell_logits = head(norm(pooled))
        frame_logits = head(norm(hidden[len(pix) :].mean(1)))
        loss = loss_fn(cell_logits.flatten(0, 1), cell_labels.flatten()) + loss_fn(frame_logits, frame_digits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            with torch.no_grad():
                known = cell_labels != -100
                cell_acc = (cell_logits.argmax(-1)[known] == cell_labels[known]).float().mean().item()
                frame_acc = (frame_logits.argmax(-1) == frame_digits).float().mean().item()
            log.append({"step": step + 1, "minutes": round((time.time() - start) / 60, 2), "loss": loss.item(),
                        "cell_accuracy": cell_acc, "frame_accuracy": frame_acc})  # fmt: skip
            print(f"vision step {step + 1}/{steps} loss {loss.item():.4f} cells right {cell_acc:.3f} "
                  f"frames right {frame_acc:.3f} {(time.time() - start) / 60:.1f} min", flush=True)  # fmt: skip
    return log


def video_pixels(frames, processor) -> torch.Tensor:
    from illava.adapters.llava_onevision import _video_pixels

    return _video_pixels(frames, processor, np)


def turn(question: str) -> str:  # a later turn of the conversation (the chat template's format)
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def conversation_batch(model, tokenizer, processor, items, video: bool, turns: int, rng):
    """Inputs and labels of one row per scene/clip, up to ``turns`` questions as turns."""
    prompts, answers = [], []
    for item in items:
        qs = (D.clip_questions if video else D.scene_questions)(item, rng)
        rng.shuffle(qs)
        qs = qs[:turns]
        text = ""
        for k, (_, q, a) in enumerate(qs):
            text += D.prompt(q, video) if k == 0 else turn(q)
            text += "\0" + a + "<|im_end|>"
        prompts.append(text)
        answers.append([a for _, _, a in qs])
    media = {"videos": [c.frames for c in items]} if video else {"images": [s.image for s in items]}
    # build() expands the placeholders; answers are marked with \0 to find them after tokenizing
    plain = [p.replace("\0", "") for p in prompts]
    inputs = build(model.config, tokenizer, plain, image_processor=processor, **media)
    tokenizer_right = inputs["input_ids"]
    labels = torch.full_like(tokenizer_right, -100)
    eos = tokenizer.eos_token_id
    for i, ans in enumerate(answers):
        ids = tokenizer_right[i].tolist()
        # answers sit right after each "assistant" (whitespace is not a token) and end at an eos
        assistant = tokenizer.convert_tokens_to_ids("assistant")
        starts = [j + 1 for j, t in enumerate(ids) if t == assistant]
        for j, a in zip(starts, ans):
            n = len(tokenizer(a)["input_ids"])
            labels[i, j : j + n + 1] = torch.tensor(ids[j : j + n + 1])
            assert ids[j + n] == eos, "answer not followed by the end token"
    return inputs, labels


@torch.no_grad()
def evaluate(model, tokenizer, processor, data: D.TestSet, batch: int = 32) -> dict[str, float]:
    """Exact-match accuracy per kind, teacher-forced (every answer token and the end token the
    argmax given the right prefix: the same as greedy decoding's exact match), stock forward."""
    model.eval()
    ok = []
    rows = data.rows
    for video in (False, True):
        group = [r for r in rows if r.video == video]
        for s in range(0, len(group), batch):
            chunk = group[s : s + batch]
            texts = [D.prompt(r.question, video) + r.answer + "<|im_end|>" for r in chunk]
            media = (
                {"videos": [data.clips[r.media].frames for r in chunk]}
                if video
                else {"images": [data.scenes[r.media].image for r in chunk]}
            )
            inputs = build(model.config, tokenizer, texts, image_processor=processor, **media)
            logits = model(**inputs).logits
            for k, r in enumerate(chunk):
                n = len(tokenizer(r.answer)["input_ids"]) + 1
                target = inputs["input_ids"][k, -n:]
                ok.append((r, bool((logits[k, -n - 1 : -1].argmax(-1) == target).all())))
    model.train()
    return D.by_kind([r for r, _ in ok], torch.tensor([x for _, x in ok]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=0.2)
    parser.add_argument("--scenes-per-step", type=int, default=12)
    parser.add_argument("--clips-per-step", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--test-per-kind", type=int, default=200, help="questions per kind of the final test")
    parser.add_argument("--out", type=Path, default=Path("illava/models/digits"))
    parser.add_argument("--card-only", action="store_true", help="only (re)write the model card of --out")
    args = parser.parse_args()
    if args.card_only:
        write_card(args.out)
        return

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train_pool, _ = D.split()
    tokenizer = D.build_tokenizer()
    config = D.build_config(len(tokenizer))
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    processor = D.image_processor()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    quick = D.test_set(per_kind=50, seed=99)  # a small check during training (not the test set of the evals)

    started = time.time()
    vision_log = pretrain_vision(
        model, processor, train_pool, rng, args.vision_steps, args.vision_lr, args.scenes_per_step
    )
    vision_minutes = (time.time() - started) / 60

    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) in vision_ids], "scale": args.vision_lr_scale},
            {"params": [p for p in model.parameters() if id(p) not in vision_ids], "scale": 1.0},
        ],
        lr=args.lr,
        weight_decay=0.01,
        betas=(0.9, 0.98),
    )
    model.train()
    start, losses, log = time.time(), [], []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 60) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for video, count in ((False, args.scenes_per_step), (True, args.clips_per_step)):
            if count == 0:
                continue
            items = (
                [D.make_clip(rng, train_pool) for _ in range(count)]
                if video
                else [D.make_scene(rng, train_pool) for _ in range(count)]
            )
            inputs, labels = conversation_batch(model, tokenizer, processor, items, video, args.turns, rng)
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(total)
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-20:]):.4f} lr {lr:.2e} "
                  f"{(time.time() - start) / 60:.1f} min", flush=True)  # fmt: skip
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = evaluate(model, tokenizer, processor, quick)
            log.append({"step": step + 1, "minutes": round((time.time() - start) / 60, 2), "accuracy": acc})
            print(f"step {step + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
    minutes = (time.time() - start) / 60
    model.eval()
    final = evaluate(model, tokenizer, processor, D.test_set(args.test_per_kind))
    print(
        f"test set ({args.test_per_kind} per kind): " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()), flush=True
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    info = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    info.update(vision_minutes=round(vision_minutes, 1), minutes=round(minutes, 1), vision_log=vision_log, log=log,
                test_accuracy=final)  # fmt: skip
    (out / "training.json").write_text(json.dumps(info, indent=2))
    write_card(out)
    print(f"saved to {out}")


def write_card(out: Path) -> None:
    info = json.loads((out / "training.json").read_text())
    size = (out / "model.safetensors").stat().st_size / 2**20
    acc = info["test_accuracy"]
    rows = "\n".join(f"| {k} | {100 * v:.1f}% |" for k, v in acc.items())
    (out / "README.md").write_text(
        f"""# digits LLaVA-OneVision (illava's detail check)

A small `LlavaOnevisionForConditionalGeneration` (SigLIP encoder + Qwen2 decoder, stock transformers
classes) trained from scratch by `training/train_digits.py` on 2 CPU cores, seed {info["seed"]}, to
answer questions about handwritten digits (scikit-learn's `load_digits`, split by sample; test digits
unseen) placed on a 96 px canvas (AnyRes: base view + four 48 px crops, 744 visual tokens) or shown
one per frame in 6-frame clips. It exists so that illava can measure what token merging does where
answers depend on small, localised detail. Data and questions: `illava/tools/digits.py`.

- Architecture: vision 6 layers, width 128, 48 px crops of 4x4 px patches (144 patches per crop);
  decoder 4 layers, width 128; word-level tokenizer; {size:.1f} MB of float32 safetensors.
- Stage 1: {info["vision_steps"]} steps ({info["vision_minutes"]} min), the vision tower alone learns the
  digit of every grid cell (mean of its tokens over the cell, in every view) and of every frame.
- Stage 2: {info["steps"]} steps ({info["minutes"]} min) of {info["scenes_per_step"]} scenes and
  {info["clips_per_step"]} clips, up to {info["turns"]} questions each as turns; lr {info["lr"]}
  (vision x{info["vision_lr_scale"]}), warm-up and cosine decay.
- Exact-match accuracy of the stock model on the test set ({info["test_per_kind"]} questions per kind,
  seed 1234; teacher-forced, which equals greedy decoding's exact match):

| kind | accuracy |
|---|---|
{rows}

Prompt: `<|im_start|>user\\n<image>\\n{{question}}<|im_end|>\\n<|im_start|>assistant\\n` (`<video>` for clips).
What illava does to its accuracy: `illava eval digits`.
"""
    )


if __name__ == "__main__":
    main()
