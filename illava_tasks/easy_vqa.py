"""An accuracy check that can fail: a small LLaVA-OneVision trained here on easy-VQA.

The model ships with the package (``MODEL_DIR``: ``illava_tasks/models/easy-vqa``, 4 MB): trained on 2
CPU cores in under an hour by ``training/train_easy_vqa.py`` (its model card and ``training.json``
sit next to the weights). It is
the embedded default of ``illava`` (the demo) and what ``tests/test_fidelity.py`` scores.

Every answer of easy-VQA is one word, one token of the model's tokenizer (the first tokens of the 13
answers are distinct with a subword tokenizer too: the real-weights model of ``illava_tasks.real``),
so a prediction is the argmax of the logits of the first generated token, computed by the stock forward pass with
illava applied (both stages). ``run_eval`` scores the stock model, each preset, each recycle mode,
a sweep of reduction levels and a deliberately broken policy (``illava.testing.InvertedScores``: prune
keeping the *lowest*-scored tokens; a check that cannot see this lose accuracy cannot tell a good
scorer from a bad one), with the analytic prefill FLOPs of every setting.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaOnevisionConfig, PreTrainedTokenizerFast
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from illava import api
from illava.config import IllavaConfig
from illava.testing import InvertedScores
from illava.tools.realparts import CHAT_TEMPLATE  # ChatML with image parts, as SmolLM2 writes it
from illava_tasks import load_trained

MODEL_DIR = Path(__file__).parent / "models" / "easy-vqa"


SPECIALS = ["<pad>", "<image>", "<video>", "<unk>", "<|im_start|>", "<|im_end|>"]
CROP, PATCH = 56, 4


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of every word of ``texts`` (ids 0-5 special), with the chat template."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = set()
    for text in texts:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for piece in ["\n", "user", "assistant", *sorted(words)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<image>", "<video>", "<|im_start|>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(vocab_size: int) -> LlavaOnevisionConfig:
    """The small LLaVA-OneVision trained on easy-VQA (196 patches per 56 px crop)."""
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "image_size": CROP,
            "patch_size": PATCH,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 1024,
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
        image_grid_pinpoints=[[CROP, CROP]],
        tie_word_embeddings=True,
    )


def image_processor() -> LlavaOnevisionImageProcessorPil:
    """PIL image processor: 56 px base view + one 56 px AnyRes crop."""
    return LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP}, image_grid_pinpoints=[[CROP, CROP]], do_pad=True
    )


def prompt(question: str) -> str:
    """The prompt format the model was trained with (its chat template for one image + text)."""
    return f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"


def load(path: str | Path | None = None):
    """(model, tokenizer, image processor) of the shipped model (or of ``path``), from Hugging Face files."""
    return load_trained(path, MODEL_DIR, "easy-VQA", "train_easy_vqa.py")


def question_kind(question: str, answer: str) -> str:
    """ "open" (the answer names a shape or a colour), "present" (a yes/no question about what the
    image shows) or "absent" (about what it does not show)."""
    if answer not in ("yes", "no"):
        return "open"
    negated = bool(set(question.replace("?", " ").split()) & {"not", "no"})
    return "present" if (answer == "yes") != negated else "absent"


def test_questions(limit: int | None = 1000, seed: int = 0, kinds: str = "all") -> list[tuple[str, str, str]]:
    """(question, answer, image path) of easy-VQA's test split; a fixed random subset of ``limit``.

    ``kinds="open"`` keeps the questions whose answer names a shape or a colour (2,537 of 9,673):
    the shipped model answers those from the image, its yes/no answers mostly from a prior (see the
    results in docs/results.md), so the open questions are where merging can show a loss."""
    import easy_vqa

    if kinds not in ("all", "open"):
        raise ValueError(f"kinds must be 'all' or 'open', got {kinds!r}")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    rows = [(q, a, paths[i]) for q, a, i in zip(questions, answers, image_ids)]
    if kinds == "open":
        rows = [r for r in rows if question_kind(r[0], r[1]) == "open"]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


@dataclass
class Score:
    setting: str
    accuracy: float
    visual_tokens: dict
    gflops: float
    config: str
    kinds: dict | None = None  # accuracy per question kind (``question_kind``: open, present, absent)


def predict(model, tokenizer, processor, rows, batch: int = 64) -> torch.Tensor:
    """Log-probabilities ``(len(rows), vocab)`` of the first answer token of every question (the
    model as it is set up: stock or with illava applied), from one forward of the prompt."""
    from PIL import Image

    from illava.tools.inputs import build, for_model

    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            images = [Image.open(p).convert("RGB") for _, _, p in chunk]
            inputs = build(model.config, tokenizer, [prompt(q) for q, _, _ in chunk], images, image_processor=processor)
            inputs = for_model(inputs, model)
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(out)


def answer_token(tokenizer, answer: str) -> int:
    """The id of the first token of ``answer`` (the word-level tokenizer of the shipped model: the
    answer itself; a subword one, e.g. SmolLM2's: ``rect`` of rectangle, ``te`` of teal, all 13
    answers still distinct)."""
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    if not ids or ids[0] == tokenizer.unk_token_id:
        return -1  # never predicted
    return ids[0]


def correct(tokenizer, rows, log_probs: torch.Tensor) -> torch.Tensor:
    """Whether the argmax of every row of ``log_probs`` is the first token of that question's answer
    (bool tensor)."""
    ids: dict[str, int] = {}
    for _, answer, _ in rows:
        if answer not in ids:
            ids[answer] = answer_token(tokenizer, answer)
    wanted = [ids[answer] for _, answer, _ in rows]
    return log_probs.argmax(-1) == torch.tensor(wanted)


def by_kind(rows, ok: torch.Tensor) -> dict[str, float]:
    """Accuracy per question kind (``question_kind``) of the kinds present in ``rows``."""
    kinds = [question_kind(q, a) for q, a, _ in rows]
    return {k: ok[torch.tensor([x == k for x in kinds])].float().mean().item() for k in dict.fromkeys(kinds)}


def accuracy(model, tokenizer, processor, rows, batch: int = 64) -> float:
    """Share of questions whose first generated token is the answer (the model as it is set up)."""
    return correct(tokenizer, rows, predict(model, tokenizer, processor, rows, batch)).float().mean().item()


def _flops(model, tokenizer, processor, row) -> tuple[float, dict]:
    """Prefill GFLOPs and visual tokens of one question (all images are 64x64: same counts)."""
    from PIL import Image

    from illava.tools.flops import prefill_flops
    from illava.tools.inputs import build

    image = Image.open(row[2]).convert("RGB")
    inputs = build(model.config, tokenizer, [prompt(row[0])], [image], image_processor=processor)
    was_applied = api.is_applied(model)
    if not was_applied:
        api.apply(model, IllavaConfig())  # counts need an enabled patch; no stage: stock compute
    with torch.inference_mode():
        model(**inputs, use_cache=False, logits_to_keep=1)
    stats = api.stats(model)
    gflops = prefill_flops(model, stats, inputs["input_ids"].shape[1])["total"]
    tokens = stats.visual_tokens()
    if not was_applied:
        api.remove(model)
    return gflops, tokens


def settings(model, levels=(0.5, 1.25, 1.5)) -> list[tuple[str, IllavaConfig | None]]:
    """(name, config or None for stock) of every setting ``run_eval`` scores."""
    from illava.tools.bench import sweep_config

    image = api.configure(model, "image")
    out: list[tuple[str, IllavaConfig | None]] = [("stock", None)]
    for name in ("image", "video", "encoder-only", "llm-only"):
        out.append((f"preset {name}", api.configure(model, name)))
    for mode in ("cluster", "prune"):
        out.append((f"image, recycle {mode}", image.replace(recycle=mode)))
    for level in levels:
        config = sweep_config(image, level)
        try:
            api.configure(model, config)
        except ValueError as error:  # e.g. more removed than there are tokens
            warnings.warn(f"easy-VQA sweep level {level:g} skipped: {error}", stacklevel=2)
            continue
        out.append((f"image x{level:g}", config))
    out.append(("image, INVERTED scores (broken on purpose)", image.replace(policy=InvertedScores())))
    return out


def run_eval(model, tokenizer, processor, rows, levels=(0.5, 1.25, 1.5), progress=None, chosen=None) -> list[Score]:
    """Accuracy and prefill FLOPs on ``rows`` of every setting of ``settings(model, levels)`` (or of
    ``chosen``, a list such as ``settings`` returns)."""
    scores = []
    for name, config in chosen if chosen is not None else settings(model, levels):
        if config is None:
            api.remove(model)
        else:
            api.apply(model, config)
        ok = correct(tokenizer, rows, predict(model, tokenizer, processor, rows))
        gflops, tokens = _flops(model, tokenizer, processor, rows[0])
        config_text = "stock" if config is None else str(config)
        scores.append(Score(name, ok.float().mean().item(), tokens, gflops, config_text, by_kind(rows, ok)))
        if progress:
            progress(scores[-1])
    api.remove(model)
    return scores


def plot(scores: list[Score], path: str) -> None:
    """Accuracy vs prefill GFLOPs, one point per setting."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for s in scores:
        broken = "INVERTED" in s.setting
        ax.scatter(s.gflops, 100 * s.accuracy, marker="x" if broken else "o", color="red" if broken else None)
        ax.annotate(s.setting, (s.gflops, 100 * s.accuracy), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("prefill GFLOPs (analytic, one question)")
    ax.set_ylabel("easy-VQA accuracy (%)")
    ax.set_title("illava on the shipped easy-VQA model: accuracy vs compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------ methods at equal FLOPs
@dataclass
class MethodScore:
    method: str
    target: float  # share of stock prefill FLOPs asked for (1.0: stock itself)
    share: float  # achieved
    knob: float | None
    reached: bool
    visual_tokens: dict
    accuracy_all: float
    accuracy_open: float
    agreement: float  # share of questions answered as stock answers them
    kl: float  # mean KL(stock || method) of the first answer token, nats
    config: str
    kinds: dict | None = None  # accuracy per question kind over all evaluated rows (``by_kind``)


def question_sets(limit: int = 500, seed: int = 0, open_only: bool = False) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The questions of a method comparison: ``limit`` of all test questions and ``limit`` open ones
    (fixed subsets, united); returns (rows, in the "all" subset, in the "open" subset).
    ``open_only``: the ``limit`` open ones alone (both masks all true)."""
    if open_only:
        rows = test_questions(limit, seed, "open")
        return rows, torch.ones(len(rows), dtype=torch.bool), torch.ones(len(rows), dtype=torch.bool)
    every = test_questions(limit, seed, "all")
    opened = test_questions(limit, seed, "open")
    rows = list(dict.fromkeys(every + opened))
    in_all, in_open = set(every), set(opened)
    return rows, torch.tensor([r in in_all for r in rows]), torch.tensor([r in in_open for r in rows])


def compare_methods(
    model, tokenizer, processor, rows, in_all, in_open, methods, budgets, progress=None, solved_progress=None
) -> list[MethodScore]:
    """Every method of ``methods`` at every FLOPs share of ``budgets`` (knobs solved on the first
    question by ``illava.tools.budget``; all images of easy-VQA have one size), scored against the
    answers and against stock: accuracy on all and on open questions, agreement with stock's
    answer, mean KL divergence of the first answer token's distribution from stock's."""
    from PIL import Image

    from illava.tools.inputs import build, for_model
    from illava_tasks.compare import scored

    probe = rows[0]
    probe_inputs = build(
        model.config, tokenizer, [prompt(probe[0])], [Image.open(probe[2]).convert("RGB")], image_processor=processor
    )

    def make(s, ok, agree, kl) -> MethodScore:
        all_, open_ = ok[in_all].float().mean().item(), ok[in_open].float().mean().item()
        return MethodScore(
            s.method, s.target, s.share, s.knob, s.reached, s.visual_tokens, all_, open_, agree, kl, s.config,
            by_kind(rows, ok),
        )  # fmt: skip

    return scored(
        model, methods, budgets, for_model(probe_inputs, model), lambda: predict(model, tokenizer, processor, rows),
        lambda log_probs: correct(tokenizer, rows, log_probs), make, progress, solved_progress,
    )  # fmt: skip


def plot_methods(
    scores, path: str, field: str = "accuracy_open", title: str = "easy-VQA model", what: str = "open questions"
) -> None:
    """Accuracy (``field``: open questions) and KL from stock vs share of stock prefill FLOPs, a line per
    method (also for the scenes task's scores)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    stock = next(s for s in scores if s.method == "stock")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    methods = list(dict.fromkeys(s.method for s in scores if s.method != "stock"))
    colours = iter([plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] * 2)
    for method in methods:
        points = sorted((s for s in scores if s.method == method), key=lambda s: s.share)
        x = [100 * s.share for s in points]
        style = {"marker": "o", "ls": "-" if method.startswith("illava") else "--", "label": method}
        if method in ("random", "pool"):  # the controls
            style |= {"color": "black", "ls": ":", "marker": "x" if method == "random" else "s"}
        else:
            style["color"] = next(colours)
        left.plot(x, [100 * getattr(s, field) for s in points], **style)
        right.plot(x, [max(s.kl, 1e-6) for s in points], **style)
    left.axhline(100 * getattr(stock, field), color="black", lw=0.8, label="stock")
    left.set_ylabel(f"accuracy, {what} (%)")
    right.set_ylabel("mean KL(stock || method), first answer token (nats)")
    right.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in (left, right):
        ax.set_xlabel("prefill FLOPs, % of stock (analytic)")
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20, 33, 50, 100])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}: methods at matched prefill FLOPs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
