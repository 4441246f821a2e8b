"""Scenes: several objects per image, where detail matters (issue 39). The generator and its fixed splits.

Every scene is drawn from a seed, so the splits ship as code, not data: 224x224 images (the real-weights
LLaVA's DINOv2-S/14 input: 16x16 patches of 14 px) with 2 to 6 non-overlapping objects, each a shape
(circle, square, triangle) in a colour (red, green, blue, yellow, purple, orange), from large (84 px)
down to one or two patches (14-28 px), on a plain or a textured background (noise or stripes).

Question kinds, one-word answers (scored on the first answer token, as easy-VQA):

- ``count``: "how many circles?", "how many red shapes?" (answers "0" to "6");
- ``attribute``: the colour or the shape of a uniquely described object ("what colour is the
  triangle?" when there is one triangle; "what shape is the blue shape?");
- ``relation``: "what colour is the shape left of the green circle?" (left / right / above / below,
  asked only when exactly one object lies on that side of a unique reference);
- ``presence``: "is there a red square?", yes and no balanced;
- ``smallest``: the colour or shape of the smallest object (asked only when it is clearly smallest).

``test_split()`` is the fixed test split (seed 2026, 1,200 questions); ``train_split(n)`` draws
training scenes from another seed stream. ``chance(split)`` is each kind's chance level: the share of
its most common answer (what a model that ignores the image can reach).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
KINDS = ("count", "attribute", "relation", "presence", "smallest")
TEST_SEED = 2026
TRAIN_SEED = 7
MODEL_DIR = Path(__file__).parent / "models" / "real-scenes"


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    x: int  # centre
    y: int
    size: int  # side of the bounding box, pixels

    def box(self) -> tuple[int, int, int, int]:
        h = self.size // 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass
class Scene:
    seed: int
    things: list[Thing]
    background: str  # "plain", "noise" or "stripes"
    tint: tuple[int, int, int]
    questions: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, question, answer)

    def image(self) -> Image.Image:
        """The scene drawn (deterministic: the same pixels for the same scene)."""
        img = Image.new("RGB", (SIZE, SIZE), self.tint)
        draw = ImageDraw.Draw(img)
        rng = random.Random(self.seed * 31 + 1)
        if self.background == "noise":
            for _ in range(900):
                x, y = rng.randrange(SIZE), rng.randrange(SIZE)
                shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in self.tint)
                draw.rectangle((x, y, x + 2, y + 2), fill=shade)
        elif self.background == "stripes":
            darker = tuple(max(0, c - 35) for c in self.tint)
            for x in range(-SIZE, SIZE, 12):
                draw.line((x, 0, x + SIZE, SIZE), fill=darker, width=3)
        for t in self.things:
            _draw(draw, t, COLOURS[t.colour])
        return img


def _draw(draw, t: Thing, fill) -> None:
    """One object, filled with ``fill`` (a colour, or a label in a mask)."""
    x0, y0, x1, y1 = t.box()
    if t.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif t.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(t.x, y0), (x1, y1), (x0, y1)], fill=fill)


def _place(rng: random.Random, n: int) -> list[Thing] | None:
    things: list[Thing] = []
    for _ in range(n):
        for _ in range(200):
            size = rng.choice((14, 20, 28, 40, 56, 84)) if rng.random() < 0.7 else rng.randint(14, 84)
            h = size // 2 + 2
            x, y = rng.randint(h, SIZE - h), rng.randint(h, SIZE - h)
            if all(abs(x - t.x) > (size + t.size) // 2 + 4 or abs(y - t.y) > (size + t.size) // 2 + 4 for t in things):
                things.append(Thing(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), x, y, size))
                break
        else:
            return None
    return things


def _describe(t: Thing, things: list[Thing]) -> str | None:
    """The shortest description that names ``t`` alone ("the triangle", "the red shape", "the red
    triangle"), or None."""
    if sum(o.shape == t.shape for o in things) == 1:
        return f"the {t.shape}"
    if sum(o.colour == t.colour for o in things) == 1:
        return f"the {t.colour} shape"
    if sum(o.shape == t.shape and o.colour == t.colour for o in things) == 1:
        return f"the {t.colour} {t.shape}"
    return None


SIDES = {
    "left of": lambda o, r: o.x < r.x - (o.size + r.size) // 2,
    "right of": lambda o, r: o.x > r.x + (o.size + r.size) // 2,
    "above": lambda o, r: o.y < r.y - (o.size + r.size) // 2,
    "below": lambda o, r: o.y > r.y + (o.size + r.size) // 2,
}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _questions(rng: random.Random, things: list[Thing]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    # count: by shape or by colour, mostly of what is there (zero counts included, one time in five)
    present = rng.random() < 0.8
    if rng.random() < 0.5:
        shape = rng.choice(things).shape if present else rng.choice(SHAPES)
        out.append(("count", f"how many {shape}s are there?", str(sum(t.shape == shape for t in things))))
    else:
        colour = rng.choice(things).colour if present else rng.choice(tuple(COLOURS))
        out.append(("count", f"how many {colour} shapes are there?", str(sum(t.colour == colour for t in things))))
    # attribute of a uniquely described object: its colour when named by its shape, its shape when
    # named by its colour (an object named by both has nothing left to ask)
    described = [(t, d) for t in things if (d := _describe(t, things)) is not None]
    askable = [(t, d) for t, d in described if d in (f"the {t.shape}", f"the {t.colour} shape")]
    if askable:
        t, d = rng.choice(askable)
        if d == f"the {t.shape}":
            out.append(("attribute", f"what colour is {d}?", t.colour))
        else:
            out.append(("attribute", f"what shape is {d}?", t.shape))
    # relation: exactly one object on one side of a unique reference
    relations = []
    for ref, d in described:
        for side, test in SIDES.items():
            hits = [o for o in things if o is not ref and test(o, ref)]
            if len(hits) == 1:
                relations.append((side, d, hits[0]))
    if relations:
        side, d, hit = rng.choice(relations)
        out.append(("relation", f"what colour is the shape {side} {d}?", hit.colour))
    # presence, yes and no balanced
    if rng.random() < 0.5:
        t = rng.choice(things)
        out.append(("presence", f"is there {_a(t.colour)} {t.colour} {t.shape}?", "yes"))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if not any(t.colour == c and t.shape == s for t in things)]
        c, s = rng.choice(absent)
        out.append(("presence", f"is there {_a(c)} {c} {s}?", "no"))
    # the smallest object, when it is clearly the smallest
    by_size = sorted(things, key=lambda t: t.size)
    if by_size[1].size >= 1.5 * by_size[0].size:
        t = by_size[0]
        if rng.random() < 0.5:
            out.append(("smallest", "what colour is the smallest shape?", t.colour))
        else:
            out.append(("smallest", "what shape is the smallest shape?", t.shape))
    return out


def scene(seed: int) -> Scene:
    """The scene of ``seed`` with its questions (2 to 6 objects; deterministic)."""
    rng = random.Random(seed)
    while True:
        n = rng.randint(2, 6)
        things = _place(rng, n)
        if things is not None:
            break
    background = rng.choice(("plain", "plain", "noise", "stripes"))
    tint = tuple(rng.randint(200, 250) for _ in range(3))
    s = Scene(seed, things, background, tint)
    s.questions = _questions(rng, things)
    return s


def chance(split) -> dict[str, float]:
    """Per kind, the share of its most common answer in ``split`` (the best image-blind guess)."""
    from collections import Counter

    out = {}
    for kind in KINDS:
        answers = Counter(a for _, k, _, a in split if k == kind)
        if answers:
            out[kind] = answers.most_common(1)[0][1] / sum(answers.values())
    return out


def _split(first_seed: int, questions: int) -> list[tuple[Scene, str, str, str]]:
    out = []
    seed = first_seed
    while len(out) < questions:
        s = scene(seed)
        out.extend((s, kind, q, a) for kind, q, a in s.questions)
        seed += 1
    return out[:questions]


def test_split(questions: int = 1200) -> list[tuple[Scene, str, str, str]]:
    """The fixed test split: (scene, kind, question, answer), scenes from seed ``TEST_SEED * 100_000``."""
    return _split(TEST_SEED * 100_000, questions)


def train_split(questions: int) -> list[tuple[Scene, str, str, str]]:
    """Training questions from another seed stream (never the test scenes)."""
    return _split(TRAIN_SEED * 100_000, questions)


def training_questions(s: Scene, draws: int = 4) -> list[tuple[str, str, str]]:
    """More questions about one training scene: ``draws`` independent draws of the question rules
    (the scene's own first), without repeats. The test split asks one draw per scene."""
    out = {q: (k, q, a) for k, q, a in s.questions}
    for d in range(1, draws):
        rng = random.Random(s.seed * 1_000 + d)
        for k, q, a in _questions(rng, s.things):
            out.setdefault(q, (k, q, a))
    return list(out.values())


PATCH = 14


def patch_labels(s: Scene) -> tuple[list[int], list[int]]:
    """Per 14 px patch of the 224 px image (row-major, 256), the colour (1-6, 0: background) and the
    shape (1-3, 0: background) of the object covering most of it, when that covers at least a fifth
    of the patch. Training targets for an auxiliary head (``training/train_scenes.py``)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for n, t in enumerate(s.things, 1):
        _draw(draw, t, n)
    pixels = mask.load()
    colours, shapes = [], []
    side = SIZE // PATCH
    for py in range(side):
        for px in range(side):
            counts: dict[int, int] = {}
            for y in range(py * PATCH, (py + 1) * PATCH):
                for x in range(px * PATCH, (px + 1) * PATCH):
                    v = pixels[x, y]
                    if v:
                        counts[v] = counts.get(v, 0) + 1
            best = max(counts, key=counts.get) if counts else 0
            if best and counts[best] * 5 >= PATCH * PATCH:
                t = s.things[best - 1]
                colours.append(1 + tuple(COLOURS).index(t.colour))
                shapes.append(1 + SHAPES.index(t.shape))
            else:
                colours.append(0)
                shapes.append(0)
    return colours, shapes


def prompt(question: str) -> str:
    """The prompt the scenes model was trained with (easy-VQA's: ChatML, one image, the question)."""
    return f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"


def predict(model, tokenizer, processor, rows, batch: int = 32):
    """Log-probabilities ``(len(rows), vocab)`` of the first answer token of every (scene, kind,
    question, answer) row, from one forward of its prompt (the model as it is set up)."""
    import torch

    from illava.tools.inputs import build, for_model

    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            images = [s.image() for s, _, _, _ in chunk]
            inputs = build(
                model.config, tokenizer, [prompt(q) for _, _, q, _ in chunk], images, image_processor=processor
            )
            inputs = for_model(inputs, model)
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(out)


def correct(tokenizer, rows, log_probs):
    """Whether the argmax of every row is the first token of its answer (bool tensor)."""
    import torch

    from illava_tasks.easy_vqa import answer_token

    ids = {a: answer_token(tokenizer, a) for a in {r[3] for r in rows}}
    return log_probs.argmax(-1) == torch.tensor([ids[r[3]] for r in rows])


def by_kind(rows, ok) -> dict[str, float]:
    """Accuracy per question kind, in ``KINDS`` order, of the kinds present in ``rows``."""
    out = {}
    for kind in KINDS:
        picked = [n for n, r in enumerate(rows) if r[1] == kind]
        if picked:
            out[kind] = ok[picked].float().mean().item()
    return out


def load(path: str | Path | None = None):
    """(model, tokenizer, image processor) of the real-weights LLaVA trained on scenes
    (``training/train_scenes.py``; the shipped projector and adapters, or those of ``path``)."""
    from illava_tasks import real

    return real.load(path if path is not None else MODEL_DIR)


@dataclass
class SceneScore:
    method: str
    target: float  # share of stock prefill FLOPs asked for (1.0: stock)
    share: float  # achieved
    knob: float | None
    reached: bool
    visual_tokens: dict
    accuracy: float
    kinds: dict  # accuracy per kind
    agreement: float  # share of questions answered as stock answers them
    kl: float  # mean KL(stock || setting) of the first answer token, nats
    config: str


def compare(
    model, tokenizer, processor, rows, methods, budgets, progress=None, solved_progress=None
) -> list[SceneScore]:
    """Stock, then every method of ``methods`` at every FLOPs share of ``budgets`` (knobs solved on the
    first question: every scene is one 224 px image), scored on the answers (per kind) and against
    stock (agreement, KL of the first answer token)."""
    from illava.tools.inputs import build, for_model
    from illava_tasks.compare import scored

    probe = build(model.config, tokenizer, [prompt(rows[0][2])], [rows[0][0].image()], image_processor=processor)

    def make(s, ok, agree, kl) -> SceneScore:
        accuracy = ok.float().mean().item()
        return SceneScore(
            s.method, s.target, s.share, s.knob, s.reached, s.visual_tokens, accuracy, by_kind(rows, ok), agree, kl,
            s.config,
        )  # fmt: skip

    return scored(
        model, methods, budgets, for_model(probe, model), lambda: predict(model, tokenizer, processor, rows),
        lambda log_probs: correct(tokenizer, rows, log_probs), make, progress, solved_progress,
    )  # fmt: skip
