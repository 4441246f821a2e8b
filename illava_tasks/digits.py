"""A second accuracy check, where detail matters: reading handwritten digits (images and videos).

The easy-VQA model sees one large shape: almost any third of its tokens answers the question, so it
cannot tell a careful merge from a careless one. Here the answers depend on small, localised detail.

Data: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 digits
written by 43 people), split by sample (a fixed permutation: 1,347 train, 450 test), so test digits
are unseen. A *scene* is a 384x384 canvas with a 3x3 grid of 128 px cells; 3 to 6 cells hold a
digit (upscaled 4x to 32 px, on a 32 px slot of its cell away from the edges, jittered by up to
3 px; random ink and background levels). The LLaVA-OneVision-architecture model sees it through
AnyRes with 16 px patches: a 192 px base view (a digit is one patch there) and four 192 px crops at
full resolution (a digit is 2x2 patches): 720 patches, 744 visual tokens with the row-end tokens.
So every answer hangs on a handful of the 744 tokens. A *clip* is a video of 6 frames of 192 px,
one digit per frame (2x2 patches, one token after LLaVA-OneVision's 2x2 video pooling).

Questions (every answer is made of the words of the tokenizer; "read" answers are several digits):

- ``position``: "what digit is at the top left?" (any occupied cell: top/middle/bottom x
  left/centre/right, the middle one is "the centre");
- ``count``: "how many 3s are there?" (0 to 6; present and absent digits equally often);
- ``relation``: "what digit is right of the 5?" / "left of" (the neighbouring cell of a digit that
  occurs once);
- ``read``: "read the top row from left to right" (the digits of a non-empty row, e.g. "3 5 1");
- ``video order``: "which digit comes after the 4?" (the next frame; the digit occurs once);
- ``video count``: "how many frames show a 7?".

An answer is right when the greedy answer of ``generate`` equals it exactly; the first answer
token's distribution gives the KL divergence from stock in method comparisons.

No digits model is shipped yet: the recipe of ``training/train_digits.py`` teaches the vision tower
to read the digits and (through symbols first) the decoder to find them, but is not yet tuned to
>= 90% per kind within the CPU budget (its docstring has the measurements). ``illava eval digits --model FOLDER``
scores any model trained with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from illava import api
from illava.config import IllavaConfig
from illava_tasks import load_trained

MODEL_DIR = Path(__file__).parent / "models" / "digits"
CANVAS, CELL, CROP, PATCH = 384, 128, 192, 16
DIGIT, JITTER = 32, 3  # a digit is upscaled 4x: 2x2 patches of a crop, one patch of the base view
FRAMES = 6
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
IMAGE_KINDS = ("position", "count", "relation", "read")
VIDEO_KINDS = ("video order", "video count")
KINDS = IMAGE_KINDS + VIDEO_KINDS


# ---------------------------------------------------------------------------------------------- data
def split(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the train and test digits: a fixed permutation of scikit-learn's 1,797."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.RandomState(seed).permutation(len(data.target))
    cut = 1347
    train, test = order[:cut], order[cut:]
    return (data.images[train], data.target[train]), (data.images[test], data.target[test])


def _ink(digit: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """An 8x8 digit (0..16) as a ``size`` px float mask in [0, 1] (bilinear upscaling)."""
    img = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _paint(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, colour: np.ndarray) -> None:
    h, w = mask.shape
    region = canvas[y : y + h, x : x + w]
    region[:] = region * (1 - mask[..., None]) + colour * mask[..., None]


@dataclass
class Scene:
    image: Image.Image
    cells: dict[tuple[int, int], int]  # (row, column) -> digit
    boxes: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)  # (y, x, size)


@dataclass
class Clip:
    frames: list[Image.Image]
    digits: list[int]
    boxes: list[tuple[int, int, int]] = field(default_factory=list)  # (y, x, size) per frame


def _slot(rng: random.Random, span: int) -> int:
    """Top (or left) pixel of a digit inside ``span`` px: a slot of ``DIGIT`` px (one base-view patch)
    away from the edges, jittered by up to ``JITTER`` px."""
    return DIGIT * rng.randint(1, span // DIGIT - 2) + rng.randint(-JITTER, JITTER)


def make_scene(rng: random.Random, pool: tuple[np.ndarray, np.ndarray]) -> Scene:
    """3 to 6 digits of ``pool`` in random cells of the 3x3 grid of a 384 px canvas (``DIGIT`` px,
    on a slot of the cell, jittered)."""
    images, labels = pool
    background = rng.uniform(0, 60)
    canvas = np.full((CANVAS, CANVAS, 3), background, dtype=np.float32)
    canvas += np.asarray([rng.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
    cells, boxes = {}, {}
    for cell in rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(3, 6)):
        index = rng.randrange(len(labels))
        size = DIGIT
        y = cell[0] * CELL + _slot(rng, CELL)
        x = cell[1] * CELL + _slot(rng, CELL)
        colour = np.asarray([rng.uniform(180, 255) for _ in range(3)], dtype=np.float32)
        _paint(canvas, _ink(images[index], size, rng), y, x, colour)
        cells[cell], boxes[cell] = int(labels[index]), (y, x, size)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return Scene(image, cells, boxes)


def make_clip(rng: random.Random, pool: tuple[np.ndarray, np.ndarray], frames: int = FRAMES) -> Clip:
    """``frames`` frames of ``CROP`` px, one digit of ``pool`` each (``DIGIT`` px on a slot, jittered)."""
    images, labels = pool
    out, digits, boxes = [], [], []
    for _ in range(frames):
        index = rng.randrange(len(labels))
        size = DIGIT
        canvas = np.full((CROP, CROP, 3), rng.uniform(0, 60), dtype=np.float32)
        colour = np.asarray([rng.uniform(180, 255) for _ in range(3)], dtype=np.float32)
        y, x = _slot(rng, CROP), _slot(rng, CROP)
        _paint(canvas, _ink(images[index], size, rng), y, x, colour)
        out.append(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)))
        digits.append(int(labels[index]))
        boxes.append((y, x, size))
    return Clip(out, digits, boxes)


def place(row: int, column: int) -> str:
    return "the centre" if (row, column) == (1, 1) else f"the {ROWS[row]} {COLUMNS[column]}"


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, answer): every position, relation and read question of ``scene``, and count
    questions about every digit present plus as many absent ones."""
    out = []
    cells = scene.cells
    for (r, c), d in sorted(cells.items()):
        out.append(("position", f"what digit is at {place(r, c)}?", str(d)))
    present = sorted(set(cells.values()))
    absent = [d for d in range(10) if d not in present]
    counts = [d for d in present] + rng.sample(absent, min(len(absent), len(present)))
    for d in counts:
        out.append(("count", f"how many {d}s are there?", str(sum(v == d for v in cells.values()))))
    for (r, c), d in sorted(cells.items()):
        if sum(v == d for v in cells.values()) != 1:
            continue
        if (r, c + 1) in cells:
            out.append(("relation", f"what digit is right of the {d}?", str(cells[(r, c + 1)])))
        if (r, c - 1) in cells:
            out.append(("relation", f"what digit is left of the {d}?", str(cells[(r, c - 1)])))
    for r in range(3):
        row = [str(cells[(r, c)]) for c in range(3) if (r, c) in cells]
        if row:
            out.append(("read", f"read the {ROWS[r]} row from left to right", " ".join(row)))
    return out


def clip_questions(clip: Clip, rng: random.Random) -> list[tuple[str, str, str]]:
    out = []
    digits = clip.digits
    for i, d in enumerate(digits[:-1]):
        if digits.count(d) == 1:
            out.append(("video order", f"which digit comes after the {d}?", str(digits[i + 1])))
    present = sorted(set(digits))
    absent = [d for d in range(10) if d not in present]
    for d in present + rng.sample(absent, min(len(absent), len(present))):
        out.append(("video count", f"how many frames show a {d}?", str(digits.count(d))))
    return out


def all_words() -> list[str]:
    """Every word of every question and answer (the tokenizer's vocabulary)."""
    words = [str(d) for d in range(10)] + [f"{d}s" for d in range(10)]
    words += "what digit is at the centre how many are there right left of read row from to which comes after".split()
    words += "frames show a ?".split() + [*ROWS, *COLUMNS]
    return sorted(set(words))


# --------------------------------------------------------------------------------------- the model
def build_tokenizer():
    from .easy_vqa import build_tokenizer as word_level

    return word_level(all_words())


def build_config(vocab_size: int):
    """The small LLaVA-OneVision of this check: 192 px crops of 16 px patches (144 per crop), AnyRes
    2x2 crops for a 384 px scene; a 6-layer SigLIP of width 128 and a 4-layer Qwen2 of width 128."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "image_size": CROP,
            "patch_size": PATCH,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": 5,
            "pad_token_id": 0,
        },
        image_token_id=1,
        video_token_id=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[CROP, CROP], [CROP, CANVAS], [CANVAS, CROP], [CANVAS, CANVAS]],
        tie_word_embeddings=True,
    )


def image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP},
        image_grid_pinpoints=[[CROP, CROP], [CROP, CANVAS], [CANVAS, CROP], [CANVAS, CANVAS]],
        do_pad=True,
    )


def prompt(question: str, video: bool = False) -> str:
    """The prompt format the model was trained with (its chat template, one image or video + text)."""
    return f"<|im_start|>user\n{'<video>' if video else '<image>'}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def load(path: str | Path | None = None):
    """(model, tokenizer, image processor) of the shipped digits model (or of ``path``), from Hugging Face files."""
    return load_trained(path, MODEL_DIR, "digits", "train_digits.py")


# ------------------------------------------------------------------------------------- test set
@dataclass(frozen=True)
class Row:
    kind: str
    question: str
    answer: str
    media: int  # index into TestSet.scenes (images) or TestSet.clips (videos)

    @property
    def video(self) -> bool:
        return self.kind.startswith("video")


@dataclass
class TestSet:
    scenes: list[Scene]
    clips: list[Clip]
    rows: list[Row]

    def per_kind(self) -> dict[str, int]:
        return {k: sum(r.kind == k for r in self.rows) for k in KINDS if any(r.kind == k for r in self.rows)}


def test_set(per_kind: int = 200, seed: int = 1234, kinds=KINDS) -> TestSet:
    """``per_kind`` questions of each kind on scenes and clips of unseen test digits (fixed seed;
    at most two questions of a kind per scene or clip, so questions spread over many pictures)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {list(KINDS)}")
    _, pool = split()
    rng = random.Random(seed)
    scenes, clips, rows = [], [], []
    need = {k: per_kind for k in kinds}
    for group, make, ask, store in (
        (IMAGE_KINDS, make_scene, scene_questions, scenes),
        (VIDEO_KINDS, make_clip, clip_questions, clips),
    ):
        while any(need[k] > 0 for k in need if k in group):
            item = make(rng, pool)
            questions = ask(item, rng)
            rng.shuffle(questions)
            taken = dict.fromkeys(group, 0)
            for kind, q, a in questions:
                if need.get(kind, 0) > 0 and taken[kind] < 2:
                    need[kind] -= 1
                    taken[kind] += 1
                    rows.append(Row(kind, q, a, len(store)))
            store.append(item)
    return TestSet(scenes, clips, rows)


# ---------------------------------------------------------------------------------------- scoring
MAX_ANSWER_TOKENS = 6  # "read" answers: up to 3 digits (one token each), the end token


def inputs_for(model, tokenizer, processor, data: TestSet, rows: list[Row]):
    """Model inputs of ``rows`` (all images or all videos), left padded."""
    from illava.tools.inputs import build

    if all(r.video for r in rows):
        return build(
            model.config, tokenizer, [prompt(r.question, True) for r in rows],
            videos=[data.clips[r.media].frames for r in rows], image_processor=processor,
        )  # fmt: skip
    if any(r.video for r in rows):
        raise ValueError("a batch holds images or videos, not both")
    images = [data.scenes[r.media].image for r in rows]
    return build(model.config, tokenizer, [prompt(r.question) for r in rows], images, image_processor=processor)


def predict(model, tokenizer, processor, data: TestSet, rows=None, batch: int = 32):
    """(answers, log-probabilities of the first answer token ``(len(rows), vocab)``) of greedy
    ``generate`` on every row, the model as it is set up (stock or with illava applied)."""
    rows = data.rows if rows is None else rows
    answers: list[str | None] = [None] * len(rows)
    first = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i].video)  # images first, then videos
    groups = [[i for i in order if not rows[i].video], [i for i in order if rows[i].video]]
    with torch.inference_mode():
        for group in groups:
            for s in range(0, len(group), batch):
                chunk = group[s : s + batch]
                inputs = inputs_for(model, tokenizer, processor, data, [rows[i] for i in chunk])
                out = model.generate(
                    **inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
                new = out.sequences[:, inputs["input_ids"].shape[1] :]
                log_probs = torch.log_softmax(out.logits[0].float(), -1)
                for k, i in enumerate(chunk):
                    ids = new[k].tolist()
                    if tokenizer.eos_token_id in ids:  # the answer ends at the end token
                        ids = ids[: ids.index(tokenizer.eos_token_id)]
                    answers[i] = tokenizer.decode(ids).strip()  # other special tokens stay: wrong
                    first[i] = log_probs[k]
    return answers, torch.stack(first)


def correct(rows, answers) -> torch.Tensor:
    return torch.tensor([a == r.answer for r, a in zip(rows, answers)])


def by_kind(rows, ok: torch.Tensor) -> dict[str, float]:
    """Accuracy per question kind (and ``"all"``: the mean of the kinds, each weighted equally)."""
    out = {}
    for kind in KINDS:
        mask = torch.tensor([r.kind == kind for r in rows])
        if mask.any():
            out[kind] = ok[mask].float().mean().item()
    out["all"] = sum(out.values()) / max(1, len(out))
    return out


def _flops(model, tokenizer, processor, data: TestSet, row: Row) -> tuple[float, dict]:
    """Prefill GFLOPs and visual tokens of one question (every scene / clip has one size)."""
    from illava.tools.flops import prefill_flops

    inputs = inputs_for(model, tokenizer, processor, data, [row])
    was_applied = api.is_applied(model)
    if not was_applied:
        api.apply(model, IllavaConfig())
    with torch.inference_mode():
        model(**inputs, use_cache=False, logits_to_keep=1)
    stats = api.stats(model)
    gflops = prefill_flops(model, stats, inputs["input_ids"].shape[1])["total"]
    tokens = stats.visual_tokens()
    if not was_applied:
        api.remove(model)
    return gflops, tokens


@dataclass
class Score:
    setting: str
    accuracy: dict  # kind -> accuracy, and "all"
    visual_tokens: dict  # of an image question
    gflops: float  # of an image question
    share: float  # of stock's prefill FLOPs, image question
    video_share: float | None  # the same for a video question
    config: str
    agreement: float = 1.0
    kl: float = 0.0
    target: float | None = None  # method comparisons: share of stock prefill FLOPs asked for
    reached: bool = True  # False: the method cannot go as low (its floor)
    knob: float | None = None


def settings(model, levels=(0.5, 1.25, 1.5)) -> list[tuple[str, IllavaConfig | None]]:
    """Stock, presets, recycle modes, a sweep and the inverted scorer (as for easy-VQA)."""
    from .easy_vqa import settings as common

    return common(model, levels)


@dataclass
class Reference:
    """What every setting is compared with: stock's answers and first-token distributions, and
    stock's prefill FLOPs of an image question and of a video question."""

    answers: list[str]
    first: torch.Tensor
    image_row: Row | None
    video_row: Row | None
    image_gflops: float
    video_gflops: float | None


def reference(model, tokenizer, processor, data: TestSet) -> Reference:
    image_row = next((r for r in data.rows if not r.video), None)
    video_row = next((r for r in data.rows if r.video), None)
    api.remove(model)
    answers, first = predict(model, tokenizer, processor, data)
    image = _flops(model, tokenizer, processor, data, image_row)[0] if image_row else 1.0
    video = _flops(model, tokenizer, processor, data, video_row)[0] if video_row else None
    return Reference(answers, first, image_row, video_row, image, video)


def score(model, tokenizer, processor, data: TestSet, ref: Reference, name: str, config) -> Score:
    """One setting (``config``; None: stock) against ``ref``; leaves the model without illava."""
    if config is None:
        answers, first = ref.answers, ref.first
    else:
        api.apply(model, config)
        answers, first = predict(model, tokenizer, processor, data)
    gflops, tokens = _flops(model, tokenizer, processor, data, ref.image_row) if ref.image_row else (1.0, {})
    video_share = None
    if ref.video_row is not None:
        video_share = _flops(model, tokenizer, processor, data, ref.video_row)[0] / ref.video_gflops
    api.remove(model)
    agree = sum(a == b for a, b in zip(answers, ref.answers)) / len(answers)
    kl = (ref.first.exp() * (ref.first - first)).sum(-1).mean().item()
    return Score(
        name, by_kind(data.rows, correct(data.rows, answers)), tokens, gflops, gflops / ref.image_gflops,
        video_share, "stock" if config is None else str(config), agree, kl,
    )  # fmt: skip


def run_eval(model, tokenizer, processor, data: TestSet, chosen, progress=None) -> list[Score]:
    """Accuracy per kind, agreement and first-token KL against stock, and prefill FLOPs of every
    ``(name, config or None)`` of ``chosen``."""
    ref = reference(model, tokenizer, processor, data)
    scores = []
    for name, config in chosen:
        scores.append(score(model, tokenizer, processor, data, ref, name, config))
        if progress:
            progress(scores[-1])
    return scores


def compare_methods(model, tokenizer, processor, data: TestSet, methods, budgets, progress=None, solved_progress=None):
    """Every method at every FLOPs share of ``budgets``: knobs solved on an image question (one
    configuration per method and budget, used for the video questions too; their share is reported
    apart), scored per kind, with agreement and KL against stock. A budget out of reach repeats the
    method's floor, scored once."""
    from illava.tools.budget import solve_all

    image_row = next(r for r in data.rows if not r.video)
    probe = dict(inputs_for(model, tokenizer, processor, data, [image_row]))
    api.remove(model)
    solved = solve_all(model, methods, budgets, probe, progress=solved_progress)
    ref = reference(model, tokenizer, processor, data)
    stock = score(model, tokenizer, processor, data, ref, "stock", None)
    stock.target = 1.0
    scores, done = [stock], {}
    if progress:
        progress(stock)
    for s in solved:
        key = f"{s.config!s} {s.config.policy!r}"
        if key not in done:
            done[key] = score(model, tokenizer, processor, data, ref, s.method, s.config)
        result = Score(**{**vars(done[key]), "setting": s.method})
        result.target, result.reached, result.knob = s.target, s.reached, s.knob
        scores.append(result)
        if progress:
            progress(result)
    return scores


def ninety_nine(scores: list[Score]) -> float | None:
    """The smallest FLOPs share at which a setting keeps >= 99 % of stock's accuracy (mean of the
    kinds), among ``scores`` (None if none does)."""
    stock = next(s for s in scores if s.config == "stock")
    good = [s.share for s in scores if s.accuracy["all"] >= 0.99 * stock.accuracy["all"]]
    return min(good) if good else None


def plot(scores: list[Score], path: str, title: str = "digits model: accuracy vs prefill FLOPs") -> None:
    """Accuracy (mean of the kinds) vs share of stock prefill FLOPs, one point or line per setting."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    lines: dict[str, list[Score]] = {}
    for s in scores:
        lines.setdefault(s.setting, []).append(s)
    for name, points in lines.items():
        points = sorted(points, key=lambda s: s.share)
        broken = "INVERTED" in name
        x = [100 * s.share for s in points]
        y = [100 * s.accuracy["all"] for s in points]
        if len(points) > 1:
            ax.plot(x, y, marker="o", label=name)
        else:
            ax.scatter(x, y, marker="x" if broken else "o", color="red" if broken else None)
            ax.annotate(name, (x[0], y[0]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if any(len(p) > 1 for p in lines.values()):
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("prefill FLOPs, % of stock (analytic, image question)")
    ax.set_ylabel("accuracy, mean of question kinds (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
