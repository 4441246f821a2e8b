"""The transformers side of the vLLM tests; runs with the main test venv's python (transformers >= 5.24,
the transformers backend of illava), never inside the vLLM venv.

    python tests_vllm/reference.py build FAMILY DIR
        a tiny random-weight model of FAMILY (``llava``, ``qwen2_vl``, ``qwen2_5_vl``) saved to DIR
        as vLLM loads it (weights, tokenizer built offline, processor, chat template)
    python tests_vllm/reference.py run DIR REQUESTS.json
        for every request ``{"prompt", "images": [PNG paths], "videos": [.npy paths of (frames, H, W,
        3) uint8], "illava": spec or null, "max_tokens"}`` (one at a time): the greedy tokens of
        transformers' ``generate`` with illava applied (``illava.configure(model, spec)`` as the
        plugin reads it) and the visual tokens that entered the LLM; a JSON list on stdout

The prompt is the text vLLM gets (``<image>`` marks the image; Qwen-VL prompts spell
``<|vision_start|><|image_pad|><|vision_end|>``); it goes through the same saved processor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SEED = 0


def build(family: str, out: str) -> None:
    from illava.tools.inputs import word_tokenizer

    out_dir = Path(out)
    torch.manual_seed(SEED)
    tokenizer = word_tokenizer(vocab_size=256, padding_side="left")
    if family == "llava":
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        from illava.tools.families.llava import LlavaTools, tiny_llava_config

        config = tiny_llava_config()
        vllm_sized(config.text_config)
        model = LlavaForConditionalGeneration(config).eval()
        image_processor = LlavaTools().image_processor(config)
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=tokenizer.chat_template,
            image_token="<image>",
        )
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

        from illava.tools.families.qwen_vl import QwenVLTools, tiny_qwen_vl_config

        config = tiny_qwen_vl_config("2" if family == "qwen2_vl" else "2.5")
        vllm_sized(config.text_config)
        # the patch merger writes the decoder's width (Qwen2-VL: hidden_size; Qwen2.5-VL: out_hidden_size)
        vc = config.vision_config
        config.text_config.rope_parameters["mrope_section"] = [4, 6, 6]  # half of the 32-wide heads
        setattr(vc, "hidden_size" if family == "qwen2_vl" else "out_hidden_size", config.text_config.hidden_size)
        config.text_config.bos_token_id = config.text_config.eos_token_id = None  # Qwen's ids: not in 256
        cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
        model = cls(config).eval()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        qwen_tokens(out_dir)
        # the processor itself (it needs a video processor, hence torchvision) is made in the vLLM venv
        # (tests_vllm/conftest.py, ``qwen_processor``); here the image processor's settings
        settings = QwenVLTools().image_processor(config).to_dict()
        settings["image_processor_type"] = "Qwen2VLImageProcessor"
        (out_dir / "preprocessor_config.json").write_text(json.dumps(settings, indent=1))
        return
    else:
        raise SystemExit(f"unknown family {family!r}")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    from illava.tools.vllm_bench import hub_names  # the hub's (and vLLM's) names of the CLIP tower

    hub_names(out_dir)


QWEN_TOKENS = {"<image>": "<|image_pad|>", "<video>": "<|video_pad|>"}


def qwen_tokens(folder: Path) -> None:
    """The tiny tokenizer with Qwen's spellings of the placeholders (ids 1 and 2, the tiny
    configuration's): the stock Qwen2-VL processor looks them up by name."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        text = path.read_text()
        for old, new in QWEN_TOKENS.items():
            text = text.replace(json.dumps(old), json.dumps(new))
        path.write_text(text)


def vllm_sized(text_config) -> None:
    """vLLM's CPU attention needs heads of at least 32: the tiny decoder at width 128 (4 heads of
    32, 2 key-value heads)."""
    text_config.hidden_size, text_config.intermediate_size, text_config.head_dim = 128, 256, 32
    text_config.initializer_range = 0.15  # wider random weights: greedy tokens that vary with the input


def run(folder: str, requests_path: str) -> None:
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import illava

    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    qwen = model.config.model_type in ("qwen2_vl", "qwen2_5_vl")
    processor = qwen_inputs(model.config, folder) if qwen else AutoProcessor.from_pretrained(folder)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always max_tokens tokens
    results = []
    for request in json.loads(Path(requests_path).read_text()):
        images = [Image.open(p).convert("RGB") for p in request.get("images", [])] or None
        videos = [list(np.load(p)) for p in request.get("videos", [])]  # (frames, H, W, 3) uint8 each
        extra = {"videos": videos} if videos else {}
        inputs = processor(images=images, text=[request["prompt"]], return_tensors="pt", **extra)
        spec = request.get("illava")
        if spec is None:
            illava.remove(model) if illava.is_applied(model) else None
        else:
            name, knob, overrides = split_spec(spec)
            illava.apply(model, illava.configure(model, name, knob, **overrides))
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=request["max_tokens"], do_sample=False, output_logits=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        top2 = [torch.log_softmax(step[0].float(), -1).topk(2).values.tolist() for step in out.logits]
        visual = illava.stats(model).visual_tokens()["after_encoder"] if spec is not None else None
        results.append(
            {
                "tokens": tokens,
                "visual_tokens": visual,
                "prompt_tokens": inputs["input_ids"].shape[1],
                "prompt_ids": inputs["input_ids"][0].tolist(),
                "margins": [a - b for a, b in top2],  # top-1 minus top-2 log-probability, step by step
            }
        )
    json.dump(results, sys.stdout)


def qwen_inputs(config, folder: str):
    """Qwen-VL inputs as the stock processor makes them (``illava.tools``'s builder: this venv has
    no torchvision for the stock processor's video half): ``<|vision_start|><|image_pad|><|vision_end|>``
    (``<|video_pad|>``) in the prompt becomes the image's (video's) placeholders, the frames packed as
    the stock video processor packs them (``video_pixels``; equal pixels, tests_vllm/test_qwen_vl.py)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from illava.tools.families.qwen_vl import QwenVLTools

    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"

    def process(images=None, text=(), return_tensors="pt", videos=()):
        prompts = [t.replace(image, "<image>").replace(video, "<video>") for t in text]
        return QwenVLTools().build_inputs(
            config, tokenizer, prompts, images or (), videos, image_processor=image_processor
        )  # fmt: skip

    return process


def split_spec(spec):
    """A plugin spec (a name, or a mapping with ``preset`` / ``method``, ``knob`` and field
    overrides) as ``illava.configure``'s arguments."""
    if isinstance(spec, str):
        return spec, None, {}
    spec = dict(spec)
    name = spec.pop("preset", None) or spec.pop("method", None)
    knob = spec.pop("knob", None)
    if name is None:
        return illava_config(spec), None, {}
    return name, knob, spec


def illava_config(fields: dict):
    from illava import IllavaConfig

    return IllavaConfig(**fields)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"build": build, "run": run}[command](*args)
