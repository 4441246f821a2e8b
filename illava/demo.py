"""The embedded default job: one question about a real photo, baseline vs iLLaVA, side by side.

Until a trained model ships with the package, the model is a tiny LLaVA-OneVision with random
weights built from a config (no download): its answer is noise, but every code path, every token
count and the relative cost are those of the real thing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from . import api
from .architectures import tiny_llava_onevision_config
from .inputs import build_inputs, image_processor_for, word_tokenizer


def default_image() -> Image.Image:
    """A real photo shipped by scikit-image (Chelsea the cat, 451x300: not square, so AnyRes
    unpadding is exercised)."""
    from skimage import data

    return Image.fromarray(data.chelsea())


def demo_model(seed: int = 0):
    from transformers import LlavaOnevisionForConditionalGeneration

    config = tiny_llava_onevision_config()
    config.text_config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return model, word_tokenizer(config.text_config.vocab_size), image_processor_for(config)


@dataclass
class RunResult:
    answer: str
    visual_tokens: dict[str, int]
    prefill_seconds: float
    stats: str


def run_demo(
    image: Image.Image | None = None,
    question: str = "What is shown in this image?",
    preset: str = "image",
    max_new_tokens: int = 12,
    repeats: int = 5,
) -> dict[str, RunResult]:
    """Answer ``question`` about ``image`` with the stock model and with iLLaVA; time the prefill
    of both in alternation (median of ``repeats``)."""
    model, tokenizer, processor = demo_model()
    image = image if image is not None else default_image()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}], tokenize=False, add_generation_prompt=True
    )
    inputs = build_inputs(model.config, tokenizer, processor, [prompt], [image])
    api.apply(model, preset)
    results = {}
    times: dict[str, list[float]] = {"baseline": [], "illava": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for name in times:
                api.set_enabled(model, name == "illava")
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                times[name].append(time.perf_counter() - start)
        for name in times:
            api.set_enabled(model, name == "illava")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            stats = api.stats(model)
            median = sorted(times[name])[len(times[name]) // 2]
            results[name] = RunResult(answer, stats.visual_tokens(), median, str(stats))
    api.remove(model)
    return results
