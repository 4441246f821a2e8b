"""The embedded default job: one easy-VQA question, the shipped model, baseline vs iLLaVA side by side.

The model is the small LLaVA-OneVision trained on easy-VQA by ``training/train_easy_vqa.py`` and
shipped with the package (``illava_tasks/models/easy-vqa``); the image and question come from
easy-VQA's test split (real data, not seen in training). The job prints the question, the answers,
the visual tokens per stage, the analytic prefill FLOPs and the measured prefill time of both runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from illava_tasks import easy_vqa

from .. import api
from ..config import IllavaConfig

DEFAULT_QUESTION_INDEX = 0  # easy-VQA test question 0: "what is the red shape?" (image 0)


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


@dataclass
class RunResult:
    answer: str
    visual_tokens: dict[str, int]
    prefill_seconds: float
    gflops: float
    stats: str


@dataclass
class DemoResult:
    question: str
    reference: str | None  # the dataset's answer (default example only)
    runs: dict[str, RunResult]  # "baseline", "illava"

    @property
    def speedup(self) -> float:
        return self.runs["baseline"].prefill_seconds / self.runs["illava"].prefill_seconds

    @property
    def flops_ratio(self) -> float:
        return self.runs["baseline"].gflops / self.runs["illava"].gflops


def run_demo(
    image: Image.Image | None = None,
    question: str | None = None,
    preset: str = "image",
    repeats: int = 20,
    model_path: str | Path | None = None,
    loaded: tuple | None = None,
) -> DemoResult:
    """Answer ``question`` about ``image`` (default: an easy-VQA test example) with the stock model
    and with iLLaVA; time the prefill of both in alternation (median of ``repeats``). The model:
    ``loaded`` (model, tokenizer, image processor), else the easy-VQA model of ``model_path``."""
    from .flops import prefill_flops
    from .inputs import build

    reference = None
    if image is None:
        image, default_question, default_answer = default_example()
        if question in (None, default_question):
            question, reference = default_question, default_answer
    question = question or "what shape is in the image?"
    model, tokenizer, processor = loaded if loaded is not None else easy_vqa.load(model_path)
    inputs = build(model.config, tokenizer, [easy_vqa.prompt(question)], [image], image_processor=processor)
    api.apply(model, preset)
    times: dict[str, list[float]] = {"baseline": [], "illava": []}
    runs = {}
    with torch.inference_mode():
        for name in times:  # warm-up
            api.set_enabled(model, name == "illava")
            model(**inputs, use_cache=True, logits_to_keep=1)
        for _ in range(repeats):
            for name in times:
                api.set_enabled(model, name == "illava")
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                times[name].append(time.perf_counter() - start)
        for name in times:
            # statistics are recorded while enabled: the baseline runs an enabled configuration
            # without stages (stock compute, stock counts)
            api.apply(model, IllavaConfig() if name == "baseline" else preset)
            api.set_enabled(model, True)
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
            answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            stats = api.stats(model)
            gflops = prefill_flops(model, stats, inputs["input_ids"].shape[1])["total"]
            median = sorted(times[name])[len(times[name]) // 2]
            runs[name] = RunResult(answer.strip(), stats.visual_tokens(), median, gflops, str(stats))
    api.remove(model)
    return DemoResult(question, reference, runs)
