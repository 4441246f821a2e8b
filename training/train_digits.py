"""Train the digits model: a small LLaVA-OneVision that reads handwritten digits, on the CPU, fixed seed.

The shipped model (``illava_tasks/models/digits``) is this script's defaults: stage 1 (600 steps), 2a
(600), 2b (300), 2c (750), no stage 2. Measured on 2 CPU cores, 2026-12-05: 45.5 min in all (stage 1
3.7 min, 2a 10.5 min, 2b 0.9 min, feature cache 1.3 min, 2c ~28 min); test set (200 per kind):
position 60.0%, count 86.5%, relation 59.0%, read 58.0%, video order 73.0%, video count 94.0%. Below
the 90% the issue asked for on every kind but video count; what was tried is below. The same recipe
with stage 1 400, 2a 400 of 32 + 32, 2b 200, 2c 500 of a 1,024 + 1,024 cache (26 min): 62%, 86%, 32%,
38%, 32%, 54% (50 per kind): the longer 2c (loss still falling at its end) is what helped most, so
more 2c steps are the next lever within the hour.

History (2026-12-01 to 12-05; every run reproducible from its flags):

- First data design (96 px scenes, 12-16 px digits on 4 px patches, 16 patches per digit): stage 1
  with per-patch labels reached 40% of digit patches right in 400 steps, with per-cell labels it
  stayed at the empty-cell prior; a ViT from scratch on 16-patch digits is too sample-hungry.
- Digits of 1-2 patches (this file; ``illava_tasks/digits.py``): stage 1 learns. One-patch digits:
  per-patch accuracy 52% on scenes, 88% on frames after 300 steps; 2x2-patch digits (the current
  design): 70-82% on scenes, 83-90% on frames after 300 steps (15 min). (These runs classified
  SigLIP's post-layernorm output; the model reads the layer before it, which stage 1 now trains.)
- Stage 2 with the vision tower frozen after stage 1: every kind stays at its prior for 150-300
  steps (loss ~1.70; position 8-18%, count 40-48%, read 2-10%, video count 38-50%): the decoder
  does not find the one to five tokens (of 744) that hold the answer. The attention guide (below)
  did not change that within 240 steps (``--attention-guide 0.3``; 3.9 s per step with eager
  attention against 1.9 s without).

- Clips only (217 visual tokens, 16 clips per step, 400 steps, 6 min): video order and video count
  stay at their priors too, although a linear probe on the frozen features the decoder receives
  (the pooled token of each frame's digit, before the projector) reads test digits at 91%: the
  information is there and separable from the background (cosine -0.02), the decoder does not
  learn to retrieve it. A plain stage 2 of 1,000 steps was at its priors at step 300; lr 5e-4
  instead of 2e-3 (clips only, 300 steps) changed nothing. In the clips-only model the answer
  position's layer-0 head 2 puts 97% of its attention on the visual tokens and 27% on the first
  frame's digit token (uniform: 0.5%), so the decoder learns to look at digit tokens in general;
  layers 1-3 stay near uniform (0.4-1.1% on the asked digit's tokens): it never learns to look up
  the digit the question names.

- The decoder alone, on symbols (``/tmp`` experiments, 2026-12-01, then stage 2a below): every visual
  token replaced by the word embedding of the digit under it (a learned background vector elsewhere),
  the real chat-format conversations. With all 744 / 217 tokens it stays at its priors too (clips
  only, 32 per step: 275 steps; with an attention guide on layers 1-3: 125 steps): the bottleneck is
  the decoder learning retrieval, not the vision features. With the background dropped (the digit
  tokens alone, at their stock positions, ~150-token rows; 64 scenes + 64 clips per step, lr 2e-3)
  it learns, after a plateau of ~200 steps (teacher-forced exact match on 80 scenes and 80 clips of
  unseen digits): step 400 position 71%, count 44%, read 69%, relation 51%, video count 77%, video
  order 46%; step 600 (23 min on one core) 64%, 94%, 68%, 86%, 94%, 89%. lr 4e-3: slower (step 400:
  43%, 48%, 25%, 32%, 50%, 30%). Bringing the background back gradually keeps and extends what was
  learnt (32 + 32 per step, compact to step 400, then 15% -> 100% of the background: at step 600,
  62% of it kept, 64%, 85%, 65%, 34%, 78%, 40%; steps 720-800 with the whole background, 45 min on
  one core: 66%, 91%, 65%, 40%, 85%, 42%). Position and reading plateau near 65%: the symbols carry
  no place, so the decoder must read the layout from rotary positions alone, and later turns sit
  further from the image. ``--view-positions`` (not yet measured) adds to every symbol a learned
  vector of its patch within its view, what SigLIP's position embeddings give the real features.

- Stage 2c (2026-12-05): the decoder, projector and row-end token on the real features of the frozen
  tower (cached once, so a step costs what the decoder costs), the background brought back as in 2a:
  on real images read goes from 8% to 44% within 100 steps; at the whole background the loss keeps
  falling. This made the shipped model.

So the recipe was: stage 1 (vision), 2a (the decoder on symbols: compact, then the background
back), 2b (the projector maps each patch's features onto the symbol 2a used for it), 2 (the whole
model on the real inputs). First run of all of it (a stage-1 tower of 300 steps; 2a 700 steps of
32 + 32, compact to 60% then up to 30% of the background, 17 min; 2b 150 steps, 1 min: 80% of the
digit patches are then nearest to their own digit's symbol): on real images, before any stage-2
step, position 60%, count 50%, relation 34%, read 10%, video order 42%, video count 50% (priors: 8-18%,
40-48%, ~15%, 2-10%, ~15%, 38-50%): what the decoder learnt on symbols carries over to the pixels,
except counting (2a had not reached the full background). 60 stage-2 steps (8 + 8 per step, lr 2e-3)
then: 40%, 68%, 34%, 26%, 38%, 52% (test set, 50 per kind). A second run with 2a up to the whole
background (720 steps) and 2b of 300 steps (81% nearest): before stage 2 56%, 42%, 28%, 22%, 26%,
50%; stage 2 (lr 1e-3, vision frozen) step 100: 56%, 48%, 30%, 46%, 40%, 50%; after 200 steps (test set, 50
per kind): 50%, 66%, 30%, 34%, 26%, 46%. Counting, 91% on
symbols, stays at its prior on pixels: 19% of digit patches still map nearer another symbol, and
700 imperfect background tokens blur a count; next: stage 1 and 2b longer (or 2a with noisy
symbols), then a longer stage 2. The step counts and rates of the defaults are not tuned yet.

    python training/train_digits.py                                   # the shipped model (~46 min)
    python training/train_digits.py --vision-steps 50 --steps 50 --out /tmp/d   # a quick try

Data (``illava_tasks/digits.py``): scenes of 3-6 handwritten digits (scikit-learn's, train split) on a
384 px canvas seen through AnyRes crops, and 6-frame clips of one digit per frame; questions about
position, count, neighbours, reading a row, order and count over frames. Fresh scenes every step
from a seeded generator (the weights depend on the seed and the step counts, not on machine speed).

Stages:

1. the vision tower alone learns the digit under every patch of the scenes' views and the clips'
   frames (a linear classifier, thrown away after);
2a. (``--decoder-steps``) the decoder alone learns to answer from symbols: every visual token the word
   embedding of the digit under it, a learned background vector elsewhere, in the stock token layout
   and positions; background tokens kept with a share that grows along ``--decoder-keep`` (first the
   digit tokens alone: short rows, where retrieval is learnt; then the background back);
2b. (``--align-steps``) the projector alone learns to map every patch's features onto its symbol
   (the background vector becomes the row-end token);
2c. (``--tune-steps``) the decoder, projector and row-end token learn on the real features of the
   frozen vision tower (``--cache-scenes`` + ``--cache-clips`` computed once), background kept along
   ``--tune-keep``; at share 1 a row is exactly the stock forward;
2. (``--steps``; 0 in the shipped recipe) the whole model learns to answer: next-token loss on every
   answer and its end token; each row
   is one scene (or clip) with up to ``--turns`` of its questions as successive turns of one
   conversation; AdamW with warm-up and cosine decay, the vision tower at ``--vision-lr-scale`` (0:
   frozen); optionally an *attention guide* (``--attention-guide``): one head in each of decoder
   layers 1-3 is shown which visual tokens hold the answer, fading out halfway.
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

from illava.tools.inputs import build
from illava_tasks import digits as D


def _token_labels(centres_y: np.ndarray, centres_x: np.ndarray, boxes) -> np.ndarray:
    """Digit (10: none) of every patch of one view: the patches whose centre a digit's box holds."""
    labels = np.full((len(centres_y), len(centres_x)), 10)
    for (y, x, size), digit in boxes:
        inside_y = (centres_y >= y) & (centres_y < y + size)
        inside_x = (centres_x >= x) & (centres_x < x + size)
        labels[np.ix_(inside_y, inside_x)] = digit
    return labels.reshape(-1)


def scene_token_labels(scene: D.Scene) -> np.ndarray:
    """``(5, patches)``: the digit under every patch of the base view and the four crops (the image
    processor's order), 10 where no digit's centre is."""
    side = D.CROP // D.PATCH
    k = np.arange(side)
    boxes = [(scene.boxes[cell], digit) for cell, digit in scene.cells.items()]
    scale = D.CANVAS / D.CROP  # canvas pixels per base-view pixel
    views = [(k * D.PATCH * scale + D.PATCH * scale / 2,) * 2]
    views += [
        (a * D.CROP + k * D.PATCH + D.PATCH / 2, b * D.CROP + k * D.PATCH + D.PATCH / 2)
        for a in range(2)
        for b in range(2)
    ]
    return np.stack([_token_labels(ys, xs, boxes) for ys, xs in views])


def clip_token_labels(clip: D.Clip) -> np.ndarray:
    """``(frames, patches)``: the digit under every patch of every frame, 10 elsewhere."""
    k = np.arange(D.CROP // D.PATCH) * D.PATCH + D.PATCH / 2
    return np.stack([_token_labels(k, k, [(box, d)]) for box, d in zip(clip.boxes, clip.digits)])


def _owners(centres_y: np.ndarray, centres_x: np.ndarray, boxes) -> np.ndarray:
    """Owner (a cell or frame id; -1: none) of every patch of one view: the box holding its centre."""
    owners = np.full((len(centres_y), len(centres_x)), -1)
    for (y, x, size), owner in boxes:
        owners[np.ix_((centres_y >= y) & (centres_y < y + size), (centres_x >= x) & (centres_x < x + size))] = owner
    return owners


def scene_sequence_owners(scene: D.Scene) -> np.ndarray:
    """Cell (``row * 3 + column``; -1: none) of the digit under every visual token of a scene, in the
    model's order: the base view (12x12), then the 24x24 grid of the four crops with a row-end token
    after every row (744 tokens)."""
    side = D.CROP // D.PATCH
    k = np.arange(side)
    boxes = [(scene.boxes[cell], cell[0] * 3 + cell[1]) for cell in scene.cells]
    scale = D.CANVAS / D.CROP
    base = _owners(k * D.PATCH * scale + D.PATCH * scale / 2, k * D.PATCH * scale + D.PATCH * scale / 2, boxes)
    grid = np.arange(2 * side) * D.PATCH + D.PATCH / 2  # the crops at full resolution tile the canvas
    full = _owners(grid, grid, boxes)
    rows = np.concatenate([full, np.full((2 * side, 1), -1)], 1)  # row-end tokens
    return np.concatenate([base.reshape(-1), rows.reshape(-1)])


def clip_sequence_owners(clip: D.Clip) -> np.ndarray:
    """Frame (-1: none) of the digit under every visual token of a clip: per frame the 2x2-pooled
    grid (6x6), then one row-end token (217 tokens)."""
    side = D.CROP // D.PATCH
    k = np.arange(side) * D.PATCH + D.PATCH / 2
    out = []
    for f, box in enumerate(clip.boxes):
        owners = _owners(k, k, [(box, f)]).reshape(side // 2, 2, side // 2, 2).max(axis=(1, 3))
        out.append(owners.reshape(-1))
    return np.concatenate([*out, [-1]])


def focus(item, video: bool, kind: str, question: str, answer: str) -> list[set[int]]:
    """For every token of ``answer``: the cells (or frames) it is read from (empty: none)."""
    words = question.replace("?", "").split()
    if video:
        digits = item.digits
        digit = int(words[-1])
        if kind == "video order":
            return [{digits.index(digit) + 1}]
        return [{f for f, d in enumerate(digits) if d == digit}]
    cells = {r * 3 + c: d for (r, c), d in item.cells.items()}
    if kind == "position":
        return [{next(r * 3 + c for (r, c) in item.cells if D.place(r, c) in question)}]
    if kind == "count":
        return [{cell for cell, d in cells.items() if d == int(words[2][0])}]
    if kind == "relation":
        digit = int(words[-1])
        cell = next(cell for cell, d in cells.items() if d == digit)
        return [{cell + (1 if words[3] == "right" else -1)}]
    row = D.ROWS.index(words[2])
    return [{row * 3 + c} for c in range(3) if row * 3 + c in cells]


def pretrain_vision(model, processor, pool, rng, steps: int, lr: float, batch: int, clips: int) -> list[dict]:
    """Stage 1: the vision tower alone learns the digit under every patch (a digit covers 2x2 patches
    of a crop or frame, one of the base view) of the scenes' five views and the clips' frames, and
    "none" elsewhere (weighted 0.05: most patches are background). The classifier (layer norm +
    linear) is thrown away afterwards."""
    vision = model.model.vision_tower
    width = vision.config.hidden_size
    norm, head = torch.nn.LayerNorm(width), torch.nn.Linear(width, 11)
    params = [*vision.parameters(), *norm.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    start, log = time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        scenes = [D.make_scene(rng, pool) for _ in range(batch)]
        videos = [D.make_clip(rng, pool) for _ in range(clips)]
        pix = processor([s.image for s in scenes], return_tensors="pt")["pixel_values"].flatten(0, 1)
        frames = torch.cat([video_pixels(c.frames, processor) for c in videos])
        labels = torch.from_numpy(
            np.concatenate([scene_token_labels(s) for s in scenes] + [clip_token_labels(c) for c in videos])
        )
        # the layer the model reads (``vision_feature_layer``: before SigLIP's post-layernorm)
        hidden = vision(pixel_values=torch.cat([pix, frames]), output_hidden_states=True).hidden_states
        logits = head(norm(hidden[model.config.vision_feature_layer]))
        weight = torch.where(labels == 10, 0.05, 1.0).flatten()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        loss = (per_token * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            with torch.no_grad():
                digit = labels != 10
                right = logits.argmax(-1) == labels
                scene_acc = right[: len(pix)][digit[: len(pix)]].float().mean().item()
                frame_acc = right[len(pix) :][digit[len(pix) :]].float().mean().item()
            log.append({"step": step + 1, "minutes": round((time.time() - start) / 60, 2), "loss": loss.item(),
                        "scene_digit_patches_right": scene_acc, "frame_digit_patches_right": frame_acc})  # fmt: skip
            print(f"vision step {step + 1}/{steps} loss {loss.item():.4f} digit patches right: scenes {scene_acc:.3f} "
                  f"frames {frame_acc:.3f} {(time.time() - start) / 60:.1f} min", flush=True)  # fmt: skip
    return log


def video_pixels(frames, processor) -> torch.Tensor:
    from illava.tools.families.llava_onevision import video_pixels

    return video_pixels(frames, processor, np)


def attention_guide(attentions, rows, layers=(1, 2, 3), head: int = 0) -> torch.Tensor:
    """A training aid (not part of the model): the mean of -log(attention mass on the answer's
    tokens) of one head in each of ``layers``, for every answer token with visual tokens to read
    (``rows``: (sample, query position, key mask)). One head per layer is shown where to look; the
    rest of the model learns from the answers. It breaks the chicken-and-egg of a 744-token haystack
    (no signal to attend where nothing reads the attended tokens yet) and fades out before the end."""
    sample = torch.tensor([b for b, _, _ in rows])
    query = torch.tensor([q for _, q, _ in rows])
    masks = torch.stack([m for _, _, m in rows]).float()
    terms = []
    for layer in layers:
        weights = attentions[layer][sample, head, query]  # (rows, keys)
        terms.append(-torch.log((weights * masks).sum(-1) + 1e-6).mean())
    return torch.stack(terms).mean()


def symbol_ids(item, video: bool) -> torch.Tensor:
    """The digit (10: none) under every visual token of a scene or clip, in the model's order."""
    owners = torch.from_numpy((clip_sequence_owners if video else scene_sequence_owners)(item))
    if video:
        table = torch.tensor([*item.digits, 10])
        return table[torch.where(owners < 0, len(item.digits), owners)]
    table = torch.full((10,), 10)
    for (r, c), d in item.cells.items():
        table[r * 3 + c] = d
    return table[torch.where(owners < 0, 9, owners)]


def view_positions(video: bool) -> torch.Tensor:
    """``(tokens, 4)``: for every visual token of a scene (or clip), in the model's order, the patches of
    its view (0..143, row-major: the SigLIP position embeddings its features started from) it is made
    of; -1 where none (row-end tokens). A scene's base-view and crop tokens are one patch each (repeated
    four times), a clip's tokens the 2x2 patches of a frame that the video pooling averages."""
    side = D.CROP // D.PATCH
    if video:
        i, j = torch.meshgrid(torch.arange(side // 2), torch.arange(side // 2), indexing="ij")
        corner = (2 * i * side + 2 * j).reshape(-1, 1)
        frame = corner + torch.tensor([0, 1, side, side + 1])
        return torch.cat([frame.repeat(D.FRAMES, 1), torch.full((1, 4), -1)])
    base = torch.arange(side * side)[:, None].expand(-1, 4)
    rows, cols = torch.meshgrid(torch.arange(2 * side), torch.arange(2 * side + 1), indexing="ij")
    grid = torch.where(cols < 2 * side, (rows % side) * side + cols % side, -1).reshape(-1, 1).expand(-1, 4)
    return torch.cat([base, grid])


def symbolic_batch(
    model, tokenizer, items, video: bool, turns: int, keep: float, rng, background=None, where=None, visual=None
):
    """Stage 2a inputs, without pixels: the conversations of ``conversation_batch`` in the stock token
    layout, every visual token the word embedding of the digit under it (``background`` where none),
    background tokens kept with probability ``keep``; every token keeps its stock position (so a short
    sequence still holds the layout). ``where`` (optional, ``(144, width)``): added to every visual
    token, the mean of its view patches' rows (``view_positions``; what the features know of their
    place within the view). ``visual`` (stage 2c; optional): per item its real visual tokens (``(tokens,
    width)``, ``visual_tokens``), which then replace the symbols. Returns (inputs_embeds,
    attention_mask, position_ids, labels)."""
    config = model.config
    digit_words = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    assistant, placeholder = (
        tokenizer.convert_tokens_to_ids("assistant"),
        (config.video_token_id if video else config.image_token_id),
    )
    rows = []
    for item in items:
        text, qs = conversation(item, video, turns, rng)
        ids = tokenizer(text)["input_ids"]
        at, digits = ids.index(placeholder), symbol_ids(item, video)
        ids = torch.tensor(ids[:at] + [placeholder] * len(digits) + ids[at + 1 :])  # as the processor expands it
        labels = torch.full_like(ids, -100)
        starts = torch.nonzero(ids == assistant)[:, 0] + 1
        for j, (_, _, a) in zip(starts.tolist(), qs):
            n = len(tokenizer(a)["input_ids"]) + 1  # the answer and its end token
            labels[j : j + n] = ids[j : j + n]
        symbols = torch.full_like(ids, -1)
        symbols[at : at + len(digits)] = digits
        spots = torch.full((len(ids), 4), -1)
        spots[at : at + len(digits)] = view_positions(video)
        kept = torch.rand(len(ids)) < keep
        kept = (symbols != 10) | kept  # text and digit tokens always, background with probability keep
        rows.append((ids[kept], labels[kept], torch.nonzero(kept)[:, 0], symbols[kept], spots[kept], at))
    length = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    symbols = torch.full((len(rows), length), -1)
    spots = torch.full((len(rows), length, 4), -1)
    for b, (i, lab, pos, sym, spot, _) in enumerate(rows):  # right padding
        n = len(i)
        ids[b, :n], labels[b, :n], mask[b, :n], positions[b, :n], symbols[b, :n], spots[b, :n] = (
            i, lab, 1, pos, sym, spot
        )  # fmt: skip
    embed = model.get_input_embeddings()
    x = embed(ids)
    if visual is not None:  # the real tokens of every kept visual position
        b, j = torch.nonzero(symbols >= 0, as_tuple=True)
        source = torch.cat(visual)
        offsets = torch.tensor([0] + [len(v) for v in visual[:-1]]).cumsum(0)
        starts = torch.tensor([r[5] for r in rows])
        real = torch.zeros_like(x).index_put((b, j), source[offsets[b] + positions[b, j] - starts[b]].to(x.dtype))
        return torch.where((symbols >= 0)[..., None], real, x), mask, positions, labels
    digit = embed(digit_words[symbols.clamp(0, 9)])
    x = torch.where((symbols >= 0)[..., None] & (symbols < 10)[..., None], digit, x)
    x = torch.where((symbols == 10)[..., None], background.to(x.dtype).expand_as(x), x)
    if where is not None:
        table = torch.cat([where, torch.zeros_like(where[:1])])  # row 144: none
        count = (spots >= 0).sum(-1, keepdim=True).clamp(min=1)
        x = x + table[torch.where(spots < 0, len(where), spots)].sum(2) / count
    return x, mask, positions, labels


def keep_at(schedule: list[tuple[float, float]], progress: float) -> float:
    """The share of background tokens kept at ``progress`` (0..1) of stage 2a: piecewise linear."""
    for (f0, k0), (f1, k1) in zip(schedule, schedule[1:]):
        if f0 <= progress <= f1:
            return k0 + (k1 - k0) * (progress - f0) / max(f1 - f0, 1e-9)
    return schedule[-1][1]


def answer_loss(model, x, mask, positions, labels) -> torch.Tensor:
    """Next-token loss of the decoder alone on ``inputs_embeds`` rows (stages 2a and 2c)."""
    hidden = model.model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=positions)
    logits = model.lm_head(hidden.last_hidden_state[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())


def log_step(log: list, name: str, step: int, steps: int, keep: float, losses: list, start: float) -> None:
    """Every 25 steps and at the last: the mean loss of the last 25 steps, logged and printed."""
    if (step + 1) % 25 == 0 or step + 1 == steps:
        minutes, loss = (time.time() - start) / 60, float(np.mean(losses[-25:]))
        log.append({"step": step + 1, "minutes": round(minutes, 2), "keep": round(keep, 3), "loss": loss})
        print(f"{name} step {step + 1}/{steps} keep {keep:.2f} loss {loss:.4f} {minutes:.1f} min", flush=True)


def pretrain_decoder(model, tokenizer, pool, rng, steps, lr, scenes, clips, turns, schedule, placed=False):
    """Stage 2a: the decoder learns to answer from symbols (each visual token the word embedding of the
    digit under it, a learned background vector elsewhere), first from short sequences (digit tokens
    only, at their stock positions), then with more and more of the background. The background vector
    becomes the row-end token (``image_newline``) and stage 2b's target for background patches. With
    ``placed``, a learned vector per patch of a view is added too (``symbolic_batch``'s ``where``).
    Returns (log, that table or None)."""
    lm = model.model.language_model
    background = torch.nn.Parameter(model.model.image_newline.detach().clone())
    width = background.numel()
    where = torch.nn.Parameter(torch.randn((D.CROP // D.PATCH) ** 2, width) * 0.02) if placed else None
    params = [*lm.parameters(), background] + ([where] if placed else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, log, losses = time.time(), [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        keep = keep_at(schedule, step / steps)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for video, count in ((False, scenes), (True, clips)):
            if count == 0:
                continue
            items = [(D.make_clip if video else D.make_scene)(rng, pool) for _ in range(count)]
            x, mask, positions, labels = symbolic_batch(
                model, tokenizer, items, video, turns, keep, rng, background, where
            )
            loss = answer_loss(model, x, mask, positions, labels)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(total)
        log_step(log, "decoder", step, steps, keep, losses, start)
    with torch.no_grad():
        model.model.image_newline.copy_(background)
    return log, (where.detach() if placed else None)


def align_projector(model, tokenizer, processor, pool, rng, steps, lr, scenes, clips, where=None) -> list[dict]:
    """Stage 2b: the projector alone (vision tower and decoder frozen) learns to map every patch's
    features to the symbol stage 2a used for it: the digit's word embedding, or the background vector
    (``image_newline``) where none (weighted 0.05: most patches are background), plus the patch's row
    of ``where`` if stage 2a used one; squared error."""
    projector = model.model.multi_modal_projector
    embed = model.get_input_embeddings()
    digit_words = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    with torch.no_grad():
        targets = torch.cat([embed(digit_words), model.model.image_newline[None]])  # (11, width)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    vision, layer = model.model.vision_tower, model.config.vision_feature_layer
    start, log = time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        items = [D.make_scene(rng, pool) for _ in range(scenes)]
        videos = [D.make_clip(rng, pool) for _ in range(clips)]
        pix = [processor([s.image for s in items], return_tensors="pt")["pixel_values"].flatten(0, 1)] if scenes else []
        pix += [torch.cat([video_pixels(c.frames, processor) for c in videos])] if clips else []
        labels = torch.from_numpy(
            np.concatenate([scene_token_labels(s) for s in items] + [clip_token_labels(c) for c in videos])
        )
        with torch.no_grad():
            features = vision(pixel_values=torch.cat(pix), output_hidden_states=True).hidden_states[layer]
        target = targets[labels] + (where if where is not None else 0)  # (views, 144, width)
        error = ((projector(features) - target) ** 2).mean(-1)
        weight = torch.where(labels == 10, 0.05, 1.0)
        loss = (error * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            with torch.no_grad():  # the nearest symbol of every digit patch: its own digit?
                shift = where if where is not None else 0
                nearest = torch.cdist(projector(features) - shift, targets[None]).argmin(-1)
                right = (nearest == labels)[labels != 10].float().mean().item()
            log.append({"step": step + 1, "loss": loss.item(), "digit_patches_nearest_right": right})
            print(f"projector step {step + 1}/{steps} loss {loss.item():.4f} digit patches nearest their digit "
                  f"{right:.3f} {(time.time() - start) / 60:.1f} min", flush=True)  # fmt: skip
    return log


def cache_features(model, processor, pool, rng, scenes: int, clips: int, chunk: int = 16):
    """Stage 2c's data: ``scenes`` scenes and ``clips`` clips with the frozen vision tower's features
    (the layer the model reads) of every view / frame: ((scenes, (n, 5, 144, width)), (clips, (n,
    frames, 144, width))). Computed once, so that 2c costs what the decoder costs."""
    vision, layer = model.model.vision_tower, model.config.vision_feature_layer
    out, start = [], time.time()
    for video, count in ((False, scenes), (True, clips)):
        items, feats = [], []
        for s in range(0, count, chunk):
            batch = [(D.make_clip if video else D.make_scene)(rng, pool) for _ in range(min(chunk, count - s))]
            if video:
                pix = torch.cat([video_pixels(c.frames, processor) for c in batch])
            else:
                pix = processor([x.image for x in batch], return_tensors="pt")["pixel_values"].flatten(0, 1)
            with torch.no_grad():
                hidden = vision(pixel_values=pix, output_hidden_states=True).hidden_states[layer]
            items += batch
            feats.append(hidden.reshape(len(batch), -1, *hidden.shape[1:]))
        out.append((items, torch.cat(feats)))
        print(f"cached the features of {count} {'clips' if video else 'scenes'} "
              f"{(time.time() - start) / 60:.1f} min", flush=True)  # fmt: skip
    return tuple(out)


def visual_tokens(model, features: torch.Tensor, video: bool) -> list[torch.Tensor]:
    """The stock visual tokens (projector, then AnyRes packing with row-end tokens, or the video
    pooling and the clip's end token) of ``features`` (``(items, views or frames, patches, width)``,
    the vision tower's output): what ``get_image_features`` / ``get_video_features`` make of them."""
    m, config = model.model, model.config
    x = m.multi_modal_projector(features.flatten(0, 1))
    if video:
        n = len(features)
        x = m.apply_pooling(x).reshape(n, -1, x.shape[-1])
        return list(torch.cat([x, m.image_newline[None, None].expand(n, 1, -1)], 1))
    x = x.reshape(*features.shape[:2], *x.shape[1:])
    sizes = torch.tensor([[D.CANVAS, D.CANVAS]] * len(features))
    packed, _ = m.pack_image_features(
        list(x), sizes, image_newline=m.image_newline, vision_aspect_ratio=config.vision_aspect_ratio
    )
    return packed


def tune_on_features(
    model, tokenizer, cache, rng, steps, lr, scenes, clips, turns, schedule, check=None, every: int = 0
) -> list[dict]:
    """Stage 2c: the decoder, projector and row-end token learn on the real features of the frozen
    vision tower (``cache_features``), with the background tokens kept along ``schedule`` as in 2a (at
    share 1 a row is exactly the stock forward of the frozen-tower model, at the cost of the decoder).
    ``check`` (optional): called every ``every`` steps, returns accuracies to log."""
    m = model.model
    params = [*m.language_model.parameters(), *m.multi_modal_projector.parameters(), m.image_newline]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, log, losses = time.time(), [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        keep = keep_at(schedule, step / steps)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for video, count in ((False, scenes), (True, clips)):
            if count == 0:
                continue
            pool_items, feats = cache[int(video)]
            picked = [rng.randrange(len(pool_items)) for _ in range(count)]
            visual = visual_tokens(model, feats[picked], video)
            x, mask, positions, labels = symbolic_batch(
                model, tokenizer, [pool_items[i] for i in picked], video, turns, keep, rng, visual=visual
            )
            loss = answer_loss(model, x, mask, positions, labels)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(total)
        log_step(log, "features", step, steps, keep, losses, start)
        if check is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            acc = check()
            log.append({"step": step + 1, "accuracy": acc})
            print(f"features step {step + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
    return log


def turn(question: str) -> str:  # a later turn of the conversation (the chat template's format)
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def conversation(item, video: bool, turns: int, rng) -> tuple[str, list[tuple[str, str, str]]]:
    """The text of one training row (up to ``turns`` of the item's questions, shuffled, as successive
    turns with their answers) and its (kind, question, answer) triples."""
    qs = (D.clip_questions if video else D.scene_questions)(item, rng)
    rng.shuffle(qs)
    qs = qs[:turns]
    text = "".join((D.prompt(q, video) if k == 0 else turn(q)) + a + "<|im_end|>" for k, (_, q, a) in enumerate(qs))
    return text, qs


def conversation_batch(model, tokenizer, processor, items, video: bool, turns: int, rng):
    """Inputs and labels of one row per scene/clip, up to ``turns`` questions as turns."""
    prompts, answers, sets, focus_rows = [], [], [], []
    for item in items:
        text, qs = conversation(item, video, turns, rng)
        prompts.append(text)
        answers.append([a for _, _, a in qs])
        sets.append([focus(item, video, k, q, a) for k, q, a in qs])
    media = {"videos": [c.frames for c in items]} if video else {"images": [s.image for s in items]}
    inputs = build(model.config, tokenizer, prompts, image_processor=processor, **media)  # expands placeholders
    tokenizer_right = inputs["input_ids"]
    labels = torch.full_like(tokenizer_right, -100)
    eos = tokenizer.eos_token_id
    for i, ans in enumerate(answers):
        ids = tokenizer_right[i].tolist()
        # answers sit right after each "assistant" (whitespace is not a token) and end at an eos
        assistant = tokenizer.convert_tokens_to_ids("assistant")
        starts = [j + 1 for j, t in enumerate(ids) if t == assistant]
        visual = torch.nonzero(
            tokenizer_right[i] == (model.config.video_token_id if video else model.config.image_token_id)
        )[:, 0]
        owners = torch.from_numpy((clip_sequence_owners if video else scene_sequence_owners)(items[i]))
        assert len(owners) == len(visual), (len(owners), len(visual))
        for j, a, where in zip(starts, ans, sets[i]):
            n = len(tokenizer(a)["input_ids"])
            labels[i, j : j + n + 1] = torch.tensor(ids[j : j + n + 1])
            assert ids[j + n] == eos, "answer not followed by the end token"
            for k, cells in enumerate(where):  # the query predicting answer token k attends to its cells
                mask = torch.zeros(len(tokenizer_right[i]), dtype=torch.bool)
                mask[visual[torch.isin(owners, torch.tensor(sorted(cells), dtype=torch.long))]] = True
                if mask.any():
                    focus_rows.append((i, j + k - 1, mask))
    return inputs, labels, focus_rows


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
    parser.add_argument("--vision-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--vision-lr", type=float, default=1e-3)
    parser.add_argument("--vision-scenes", type=int, default=6, help="scenes per stage-1 step")
    parser.add_argument("--vision-clips", type=int, default=3, help="clips per stage-1 step")
    parser.add_argument("--decoder-steps", type=int, default=600, help="stage 2a steps (0: none)")
    parser.add_argument("--decoder-keep", default="0:0,0.8:0,1:0.2", help="stage 2a: background kept (progress:share)")
    parser.add_argument("--decoder-lr", type=float, default=2e-3)
    parser.add_argument("--view-positions", action="store_true", help="stage 2a/2b: symbols know their place")
    parser.add_argument("--decoder-scenes", type=int, default=64, help="scenes per stage-2a step")
    parser.add_argument("--decoder-clips", type=int, default=64, help="clips per stage-2a step")
    parser.add_argument("--align-steps", type=int, default=300, help="stage 2b steps (0: none)")
    parser.add_argument("--tune-steps", type=int, default=750, help="stage 2c steps (0: none)")
    parser.add_argument("--tune-keep", default="0:0.1,0.4:1,1:1", help="stage 2c: background kept (progress:share)")
    parser.add_argument("--tune-lr", type=float, default=1e-3)
    parser.add_argument("--tune-scenes", type=int, default=32, help="scenes per stage-2c step")
    parser.add_argument("--tune-clips", type=int, default=32, help="clips per stage-2c step")
    parser.add_argument("--cache-scenes", type=int, default=2048, help="stage 2c: scenes whose features are cached")
    parser.add_argument("--cache-clips", type=int, default=2048, help="stage 2c: clips whose features are cached")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=0.2)
    parser.add_argument("--scenes-per-step", type=int, default=12)
    parser.add_argument("--clips-per-step", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--attention-guide", type=float, default=0.0, help="weight of the attention guide (0: none)")
    parser.add_argument(
        "--guide-until", type=float, default=0.5, help="share of stage 2 after which the guide has faded out"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--test-per-kind", type=int, default=200, help="questions per kind of the final test")
    parser.add_argument("--out", type=Path, default=Path("illava_tasks/models/digits"))
    parser.add_argument("--vision-from", type=Path, help="experiments: skip stage 1, load this vision tower")
    parser.add_argument("--save-vision", type=Path, help="experiments: save the vision tower after stage 1")
    parser.add_argument("--card-only", action="store_true", help="only (re)write the model card of --out")
    args = parser.parse_args()
    if args.card_only:
        write_card(args.out)
        return

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_pool, _ = D.split()
    tokenizer = D.build_tokenizer()
    config = D.build_config(len(tokenizer))
    model = LlavaOnevisionForConditionalGeneration(config)
    # the attention guide reads the decoder's attention maps (eager); the saved model uses SDPA
    model.set_attn_implementation(
        {"text_config": "eager" if args.attention_guide > 0 else "sdpa", "vision_config": "sdpa"}
    )
    processor = D.image_processor()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    quick = D.test_set(per_kind=50, seed=99)  # a small check during training (not the test set of the evals)

    def stage_rng(stage: int) -> random.Random:
        """Every stage starts from its own seed: a run resumed with ``--vision-from`` (a tower saved by
        ``--save-vision`` of the same seed) sees the same data in later stages as the whole run."""
        torch.manual_seed(args.seed * 100 + stage)
        return random.Random(args.seed * 100 + stage)

    started = time.time()
    rng = stage_rng(1)
    if args.vision_from is not None:  # experiments: a vision tower trained by an earlier stage 1
        model.model.vision_tower.load_state_dict(torch.load(args.vision_from))
        vision_log = []
    else:
        vision_log = pretrain_vision(
            model, processor, train_pool, rng, args.vision_steps, args.vision_lr, args.vision_scenes, args.vision_clips
        )
        if args.save_vision is not None:
            torch.save(model.model.vision_tower.state_dict(), args.save_vision)
    vision_minutes = (time.time() - started) / 60
    decoder_log, align_log, where = [], [], None
    rng = stage_rng(2)
    if args.decoder_steps:
        schedule = [tuple(map(float, point.split(":"))) for point in args.decoder_keep.split(",")]
        decoder_log, where = pretrain_decoder(
            model, tokenizer, train_pool, rng, args.decoder_steps, args.decoder_lr, args.decoder_scenes,
            args.decoder_clips, args.turns, schedule, args.view_positions,
        )  # fmt: skip
    rng = stage_rng(3)
    if args.align_steps:
        align_log = align_projector(
            model, tokenizer, processor, train_pool, rng, args.align_steps, args.vision_lr, args.vision_scenes,
            args.vision_clips, where,
        )  # fmt: skip
    if args.decoder_steps or args.align_steps:
        acc = evaluate(model, tokenizer, processor, quick)
        print("after stages 2a/2b: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
        decoder_log.append({"accuracy_after_2a_2b": acc})
    rng = stage_rng(4)
    tune_log = []
    if args.tune_steps:
        cache = cache_features(model, processor, train_pool, rng, args.cache_scenes, args.cache_clips)
        schedule = [tuple(map(float, point.split(":"))) for point in args.tune_keep.split(",")]
        tune_log = tune_on_features(
            model, tokenizer, cache, rng, args.tune_steps, args.tune_lr, args.tune_scenes, args.tune_clips,
            args.turns, schedule, lambda: evaluate(model, tokenizer, processor, quick), args.eval_every,
        )  # fmt: skip
        del cache
        acc = evaluate(model, tokenizer, processor, quick)
        print("after stage 2c: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
        tune_log.append({"accuracy_after_2c": acc})
    if args.vision_lr_scale == 0:
        model.model.vision_tower.requires_grad_(False)

    rng = stage_rng(5)
    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for p in model.parameters() if id(p) in vision_ids and p.requires_grad],
                "scale": args.vision_lr_scale,
            },
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
            inputs, labels, rows = conversation_batch(model, tokenizer, processor, items, video, args.turns, rng)
            guide = args.attention_guide * max(0.0, min(1.0, (args.guide_until - step / args.steps) / 0.2))
            out = model(**inputs, labels=labels, output_attentions=guide > 0)
            loss = out.loss
            if guide > 0 and rows:
                loss = loss + guide * attention_guide(out.attentions, rows)
            loss.backward()
            total += out.loss.item()
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
    total_minutes = (time.time() - started) / 60  # every stage, the checks during training included
    model.eval()
    model.set_attn_implementation("sdpa")
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
    info.update(vision_minutes=round(vision_minutes, 1), minutes=round(minutes, 1),
                total_minutes=round(total_minutes, 1), vision_log=vision_log, log=log,
                decoder_log=decoder_log, align_log=align_log, tune_log=tune_log,
                test_accuracy=final)  # fmt: skip
    (out / "training.json").write_text(json.dumps(info, indent=2))
    write_card(out)
    print(f"saved to {out}")


def card_stages(info: dict) -> str:
    """The model card's list of the training stages that ran, with their steps and minutes."""

    def minutes(log: list) -> str:
        timed = [e["minutes"] for e in log if "minutes" in e]
        return f" ({timed[-1]:.1f} min)" if timed else ""

    lines = [
        f"- Stage 1: {info['vision_steps']} steps ({info['vision_minutes']} min), the vision tower alone learns the "
        "digit under every patch (a linear classifier on the layer the decoder reads, thrown away after)."
    ]
    if info.get("decoder_steps"):
        lines.append(
            f"- Stage 2a: {info['decoder_steps']} steps{minutes(info['decoder_log'])} of "
            f"{info['decoder_scenes']} scenes and {info['decoder_clips']} clips, the decoder alone learns to "
            "answer from symbols (each visual token the word embedding of the digit under it), background "
            f"tokens kept along {info['decoder_keep']} (progress:share)."
        )
    if info.get("align_steps"):
        lines.append(
            f"- Stage 2b: {info['align_steps']} steps{minutes(info['align_log'])}, the projector alone maps "
            "every patch's features onto its symbol."
        )
    if info.get("tune_steps"):
        lines.append(
            f"- Stage 2c: {info['tune_steps']} steps{minutes(info['tune_log'])} of {info['tune_scenes']} scenes "
            f"and {info['tune_clips']} clips (drawn from {info['cache_scenes']} + {info['cache_clips']} whose "
            "features the frozen vision tower computed once), the decoder, projector and row-end token learn "
            f"on the real features, background tokens kept along {info['tune_keep']}; lr {info['tune_lr']}."
        )
    if info.get("steps"):
        lines.append(
            f"- Stage 2: {info['steps']} steps ({info['minutes']} min) of {info['scenes_per_step']} scenes and "
            f"{info['clips_per_step']} clips, the whole model (vision x{info['vision_lr_scale']}), lr {info['lr']}."
        )
    if "total_minutes" in info:
        lines.append(f"- In all {info['total_minutes']} min on 2 CPU cores (the checks during training included).")
    return "\n".join(lines)


def write_card(out: Path) -> None:
    info = json.loads((out / "training.json").read_text())
    size = (out / "model.safetensors").stat().st_size / 2**20
    acc = info["test_accuracy"]
    rows = "\n".join(f"| {k} | {100 * v:.1f}% |" for k, v in acc.items())
    stages = card_stages(info)
    (out / "README.md").write_text(
        f"""# digits LLaVA-OneVision (illava's detail check)

A small `LlavaOnevisionForConditionalGeneration` (SigLIP encoder + Qwen2 decoder, stock transformers
classes) trained from scratch by `training/train_digits.py` on 2 CPU cores, seed {info["seed"]}, to
answer questions about handwritten digits (scikit-learn's `load_digits`, split by sample; test digits
unseen) placed on a 384 px canvas (AnyRes: base view + four 192 px crops, 744 visual tokens) or shown
one per frame in 6-frame clips. It exists so that illava can measure what token merging does where
answers depend on small, localised detail. Data and questions: `illava_tasks/digits.py`.

- Architecture: vision 6 layers, width 128, 192 px crops of 16x16 px patches (144 patches per crop);
  decoder 4 layers, width 128; word-level tokenizer; {size:.1f} MB of float32 safetensors.
{stages}
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
