"""Train illava's embedded default: a small LLaVA-OneVision on easy-VQA, on the CPU, fixed seed.

    python training/train_easy_vqa.py                       # ~50 minutes on 2 cores
    python training/train_easy_vqa.py --minutes 5 --out /tmp/m   # a quick try

Data: PyPI ``easy-vqa`` (4,000 train / 1,000 test images of 64x64 px with one coloured shape;
38,575 / 9,673 questions about shape, colour and presence; 13 one-word answers).

Model: the stock ``LlavaOnevisionForConditionalGeneration`` (SigLIP encoder + Qwen2 decoder, so
illava's own adapter is what runs), small: 56 px crops of 4x4 px patches, i.e. 196 patches per crop
(base view + one AnyRes crop = 392 encoder tokens, 406 visual tokens for the LLM with the newline
tokens). A word-level tokenizer built here from the dataset's words, a chat template, and the
PIL image processor, all saved in Hugging Face format next to safetensors weights.

Training: next-token loss on the answer and the end token only; each step encodes a batch of
images once and trains on several of their questions (the image features are shared); AdamW with
warm-up and cosine decay over the time budget; fixed seeds; single-threaded data preparation.
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
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from illava.easy_vqa import build_config, build_tokenizer, image_processor, prompt


def load_split(split: str):
    import easy_vqa

    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return list(zip(questions, answers, image_ids)), paths


def pixels(paths: dict[int, str], processor) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    ids = sorted(paths)
    images = [Image.open(paths[i]).convert("RGB") for i in ids]
    out = processor(images, return_tensors="pt")
    return out["pixel_values"], out["image_sizes"], {image_id: n for n, image_id in enumerate(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=50.0, help="training time budget")
    parser.add_argument("--out", type=Path, default=Path("illava/models/easy-vqa"))
    parser.add_argument("--images-per-step", type=int, default=16)
    parser.add_argument("--questions-per-image", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--card-only", action="store_true", help="only (re)write the model card of --out")
    args = parser.parse_args()
    if args.card_only:
        write_card(args.out)
        return

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train, train_paths = load_split("train")
    test, test_paths = load_split("test")
    import easy_vqa

    tokenizer = build_tokenizer([q for q, _, _ in train + test] + easy_vqa.get_answers())
    config = build_config(len(tokenizer))
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    processor = image_processor()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    train_pix, train_sizes, train_index = pixels(train_paths, processor)
    test_pix, test_sizes, test_index = pixels(test_paths, processor)
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, image_id in train:
        by_image.setdefault(image_id, []).append((q, a))

    # token ids of each question: prompt with the image placeholders expanded, answer, end token
    from illava.inputs import image_token_count

    visual = image_token_count(config, [64, 64])
    eos = tokenizer.eos_token_id

    def encode(question: str, answer: str | None):
        ids = tokenizer(prompt(question).replace("<image>", "<image>" * visual))["input_ids"]
        if answer is None:
            return ids
        return ids, tokenizer.convert_tokens_to_ids(answer)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    image_ids = sorted(by_image)
    budget = args.minutes * 60
    start = time.time()
    step, losses = 0, []
    warmup = 100
    model.train()
    log = []
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_images = random.sample(image_ids, args.images_per_step)
        rows, owners, targets = [], [], []
        for n, image_id in enumerate(batch_images):
            for q, a in random.sample(by_image[image_id], min(args.questions_per_image, len(by_image[image_id]))):
                ids, answer = encode(q, a)
                rows.append(ids + [answer, eos])
                owners.append(n)
                targets.append(len(ids))
        length = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, targets)):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, t : t + 2] = torch.tensor(r[t : t + 2])
        index = torch.tensor([train_index[i] for i in batch_images])
        features = model.model.get_image_features(
            train_pix[index], train_sizes[index], vision_feature_layer=-1, vision_feature_select_strategy="full"
        ).pooler_output
        features = torch.stack(list(features))  # (images, visual, D)
        embeds = model.model.get_input_embeddings()(input_ids)
        placeholder = (input_ids == config.image_token_id)[..., None]
        per_row = features[torch.tensor(owners)]
        embeds = embeds.masked_scatter(placeholder, per_row.reshape(-1, per_row.shape[-1]))
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
        step += 1
        if step % 20 == 0:
            elapsed = time.time() - start
            print(f"step {step} loss {np.mean(losses[-20:]):.4f} lr {lr:.2e} {elapsed / 60:.1f} min", flush=True)
        if step % args.eval_every == 0:
            acc = evaluate(model, tokenizer, encode, test[:500], test_pix, test_sizes, test_index)
            log.append({"step": step, "minutes": (time.time() - start) / 60, "test_accuracy_500": acc})
            print(f"step {step}: test accuracy (500 questions) {acc:.4f}", flush=True)
            model.train()
    model.eval()
    minutes = (time.time() - start) / 60  # training time, without the final evaluation
    accuracy = evaluate(model, tokenizer, encode, test, test_pix, test_sizes, test_index)
    print(f"done: {step} steps in {minutes:.1f} min; test accuracy {accuracy:.4f} on {len(test)} questions")
    save(model, tokenizer, processor, args, step, minutes, accuracy, log)


@torch.no_grad()
def evaluate(model, tokenizer, encode, questions, pix, sizes, index, batch: int = 64) -> float:
    """Accuracy of the first generated token (every answer is one token), stock forward."""
    model.eval()
    correct = 0
    for s in range(0, len(questions), batch):
        chunk = questions[s : s + batch]
        rows = [encode(q, None) for q, _, _ in chunk]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        image = torch.tensor([index[i] for _, _, i in chunk])
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix[image], image_sizes=sizes[image]).logits
        predicted = tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
        correct += sum(p == a for p, (_, a, _) in zip(predicted, chunk))
    return correct / len(questions)


def save(model, tokenizer, processor, args, steps, minutes, accuracy, log) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "steps": steps,
                "minutes": round(minutes, 1),
                "images_per_step": args.images_per_step,
                "questions_per_image": args.questions_per_image,
                "lr": args.lr,
                "test_accuracy": accuracy,
                "log": log,
            },
            indent=2,
        )
    )
    write_card(out)
    print(f"saved to {out}")


def write_card(out: Path) -> None:
    """The model card (README.md) of the saved model, from its training.json."""
    info = json.loads((out / "training.json").read_text())
    size = (out / "model.safetensors").stat().st_size / 2**20
    (out / "README.md").write_text(
        f"""# easy-VQA LLaVA-OneVision (illava's embedded default)

A small `LlavaOnevisionForConditionalGeneration` (SigLIP encoder + Qwen2 decoder, stock transformers
classes) trained from scratch on [easy-VQA](https://pypi.org/project/easy-vqa/) by
`training/train_easy_vqa.py`, on 2 CPU cores, seed {info["seed"]}. It exists so that illava can
measure what token merging does to accuracy where no pretrained VLM can be downloaded.

- Data: easy-VQA train split (4,000 images of 64x64 px with one coloured shape, 38,575 questions
  about shape, colour and presence, 13 one-word answers); scored on the test split (1,000 other
  images, 9,673 questions).
- Architecture: vision 6 layers, width 96, 56 px crops of 4x4 px patches (196 patches per crop;
  base view + one AnyRes crop = 392 encoder tokens, 406 visual tokens for the LLM); projector;
  decoder 4 layers, width 128, grouped-query attention; word-level tokenizer of the dataset's words
  with a chat template; {size:.1f} MB of float32 safetensors.
- Training: next-token loss on the answer and end token; {info["steps"]} steps of
  {info["images_per_step"]} images x {info["questions_per_image"]} questions in {info["minutes"]} minutes;
  AdamW, lr {info["lr"]}, warm-up and cosine decay.
- Accuracy (first generated token == answer, stock model): **{100 * info["test_accuracy"]:.2f}%** on
  all {9673} test questions.

Load: `AutoModelForImageTextToText.from_pretrained(folder)`, `AutoTokenizer`, `AutoImageProcessor`
(and `AutoProcessor` where torchvision is installed). Prompt:
`<|im_start|>user\\n<image>\\n{{question}}<|im_end|>\\n<|im_start|>assistant\\n`.
What illava does to its accuracy: `illava eval easy-vqa` (README of illava).
"""
    )


if __name__ == "__main__":
    main()
