"""illava models for lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval), without a fork.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (see ``pyproject.toml``):
``illava`` serves every supported family (the checkpoint says which), with one alias per family,
``illava_<model_type>`` (``illava_llava_onevision``, ``illava_qwen2_vl``, ``illava_qwen2_5_vl``, ...).

Model arguments (``--model_args``): ``pretrained`` (hub id or folder), ``preset`` (an illava
preset, or ``none`` for the stock model as the baseline row), every ``IllavaConfig`` field
(tuples separated by ``;``, e.g. ``encoder_layers=5;6;7;8``), ``dtype``, ``device``,
``attn_implementation``, ``max_pixels`` (Qwen-VL), ``max_frames`` (frames sampled uniformly from
a video file, read with PyAV), ``timing_log`` (a JSON file that receives the
prefill time and throughput of the run). ``--batch_size`` > 1 runs left-padded batches.

Inputs: the model's own processor (``AutoProcessor`` with its chat template) when it can be built;
otherwise (no torchvision: the combined processors need it) the tokenizer and image processor,
with the same placeholder counts. Images (PIL) and video files are supported; only generation
tasks (``generate_until``), as for most lmms-eval vision models.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .. import api
from ..adapters import ADAPTERS, adapter_for
from ..config import IllavaConfig
from .inputs import build as build_inputs

_TUPLE_FIELDS = {"encoder_layers", "llm_layers"}
_CONFIG_FIELDS = {f.name for f in fields(IllavaConfig)} - {"preset", "policy"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def manifests():
    """Entry point of the ``lmms_eval.models`` group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    aliases = tuple(f"illava_{kind}" for adapter in ADAPTERS for kind in adapter.config_types)
    return [ModelManifest(model_id="illava", simple_class_path="illava.tools.lmms.IllavaLmms", aliases=aliases)]


def parse_config_args(preset: str | None, args: dict) -> tuple[str | None, dict]:
    """Preset and ``IllavaConfig`` overrides from lmms-eval's ``key=value`` model arguments."""
    unknown = set(args) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(
            f"illava lmms-eval model: unknown model argument(s) {sorted(unknown)}; IllavaConfig fields are "
            f"{sorted(_CONFIG_FIELDS)}"
        )
    overrides = {}
    for key, value in args.items():
        if key in _TUPLE_FIELDS:
            text = str(value)
            overrides[key] = tuple(int(v) for v in text.replace("|", ";").split(";") if v.strip())
        elif key == "encoder_removal" and isinstance(value, str) and ";" in value:
            overrides[key] = tuple(float(v) if "." in v else int(v) for v in value.split(";"))
        else:
            overrides[key] = value
    if preset is not None and str(preset).lower() in ("none", "stock", "baseline"):
        if overrides:
            raise ValueError("illava lmms-eval model: preset=none (stock model) takes no IllavaConfig fields")
        return None, {}
    return preset, overrides


class _Timer:
    """Prefill time (generate start -> first forward done) and generated tokens per batch."""

    def __init__(self, model, device: torch.device):
        self.device = device
        self.first_done = None
        self.batches: list[dict] = []
        model.register_forward_hook(self._after_forward)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _after_forward(self, module, args, output):
        if self.first_done is None:
            self._sync()
            self.first_done = time.perf_counter()

    def run(self, fn):
        self._sync()
        self.first_done = None
        start = time.perf_counter()
        out = fn()
        self._sync()
        end = time.perf_counter()
        return out, start, end

    def summary(self) -> dict:
        samples = sum(b["samples"] for b in self.batches)
        total = sum(b["seconds"] for b in self.batches)
        prefill = sum(b["prefill_seconds"] for b in self.batches)
        new_tokens = sum(b["new_tokens"] for b in self.batches)
        return {
            "samples": samples,
            "seconds": total,
            "samples_per_s": samples / total if total else None,
            "prefill_seconds_per_batch": prefill / len(self.batches) if self.batches else None,
            "prefill_seconds_total": prefill,
            "decode_tokens_per_s": new_tokens / (total - prefill) if total > prefill else None,
            "batches": len(self.batches),
        }


class IllavaLmms(lmms):
    """A transformers VLM of any supported family with illava applied, for lmms-eval's
    ``generate_until`` tasks."""

    def __init__(
        self,
        pretrained: str,
        preset: str = "image",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str = "sdpa",
        max_pixels: int | None = None,
        max_frames: int = 32,
        timing_log: str | None = None,
        system_prompt: str | None = None,
        **config_args,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText

        preset, overrides = parse_config_args(preset, config_args)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"illava lmms-eval model: dtype must be one of {sorted(_DTYPES)} or auto, got {dtype!r}")
        self._device = torch.device(device)
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=_DTYPES[dtype], attn_implementation=attn_implementation
        )
        self.model = model.to(self._device).eval()
        self.adapter = adapter_for(self.model)  # a clear TypeError for unsupported families
        self.config = None if preset is None else api.apply(self.model, preset, **overrides)
        self.batch_size_per_gpu = int(batch_size)
        self.system_prompt = system_prompt
        self.timing_log = timing_log
        self.max_pixels = max_pixels
        self.max_frames = int(max_frames)
        self._load_processor(pretrained)
        self.timer = _Timer(self.model, self._device)
        self.visual_tokens: list[dict] = []

    # ---------------------------------------------------------------------------- processor
    def _load_processor(self, pretrained: str) -> None:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        try:
            self.processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
            self.tokenizer = self.processor.tokenizer
            if getattr(self.processor, "chat_template", None) is None:
                raise ValueError("no chat template")
        except (ImportError, OSError, ValueError, TypeError, AttributeError):
            # no torchvision (combined processors need it) or no chat template: tokenizer + image processor
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
            self.image_processor = AutoImageProcessor.from_pretrained(pretrained, **kwargs)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _prompt(self, context: str, images: int, videos: int = 0) -> str:
        content = [{"type": "video"}] * videos + [{"type": "image"}] * images + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        if self.processor is not None:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # chatml (Qwen2 / Qwen2-VL / LLaVA-OV's Qwen2 decoder) with "<image>" markers for the builders
        system = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if self.system_prompt else ""
        markers = "<video>\n" * videos + "<image>\n" * images
        return f"{system}<|im_start|>user\n{markers}{context}<|im_end|>\n<|im_start|>assistant\n"

    def _inputs(self, prompts: list[str], images: list, videos: list) -> dict:
        if self.processor is not None:
            batch = self.processor(
                text=prompts,
                images=images or None,
                videos=videos or None,
                padding=True,
                return_tensors="pt",
                padding_side="left",
            )
        else:
            batch = self._fallback_inputs(prompts, images, videos)
        out = {}
        for key, value in dict(batch).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self._device)
                out[key] = value.to(self.model.dtype) if key.startswith("pixel_values") else value
        return out

    def _fallback_inputs(self, prompts, images, videos):
        config = self.model.config
        return build_inputs(config, self.tokenizer, prompts, images, videos, self.image_processor)

    # ---------------------------------------------------------------------------- lmms-eval API
    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("illava lmms-eval models support generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("illava lmms-eval models do not support multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        # batches of requests with equal generation arguments, in order
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="illava responding")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i] for i in chunk])):
                    results[i] = text
                bar.update(len(chunk))
        bar.close()
        self._write_timing()
        return results

    def _generate(self, requests: list[Instance]) -> list[str]:
        prompts, images, videos = [], [], []
        gen_kwargs = dict(requests[0].args[1] or {})
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = visuals if isinstance(visuals, list) else [visuals]
            pictures = [v.convert("RGB") for v in visuals if hasattr(v, "convert")]
            clips = [read_video(v, self.max_frames) for v in visuals if isinstance(v, str)]
            if len(pictures) + len(clips) != len([v for v in visuals if v is not None]):
                raise NotImplementedError(
                    "illava lmms-eval models: visuals must be PIL images or video file paths, got "
                    f"{sorted({type(v).__name__ for v in visuals})}"
                )
            prompts.append(self._prompt(context, len(pictures), len(clips)))
            images.extend(pictures)
            videos.extend(clips)
        inputs = self._inputs(prompts, images, videos)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        generate_kwargs = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 32)),
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            generate_kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                generate_kwargs["top_p"] = float(gen_kwargs["top_p"])
        with torch.no_grad():
            out, start, end = self.timer.run(lambda: self.model.generate(**inputs, **generate_kwargs))
        prompt_length = inputs["input_ids"].shape[1]
        new = out[:, prompt_length:]
        self.timer.batches.append(
            {
                "samples": len(requests),
                "seconds": end - start,
                "prefill_seconds": (self.timer.first_done or end) - start,
                "new_tokens": int((new != self.tokenizer.pad_token_id).sum()),
            }
        )
        if self.config is not None:
            self.visual_tokens.append(api.stats(self.model).visual_tokens())
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        cut = []
        for text in texts:
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            cut.append(text.strip())
        return cut

    def timing(self) -> dict:
        """Prefill time and throughput of everything generated so far, and the visual tokens."""
        summary = self.timer.summary()
        summary["illava_config"] = None if self.config is None else str(self.config)
        if self.visual_tokens:
            summary["visual_tokens"] = {
                key: sum(v[key] for v in self.visual_tokens) / len(self.visual_tokens)
                for key in ("stock", "after_encoder", "after_llm")
            }
        return summary

    def _write_timing(self) -> None:
        if self.timing_log:
            with open(self.timing_log, "w") as f:
                json.dump(self.timing(), f, indent=2)


def read_video(path: str, frames: int) -> list:
    """``frames`` frames sampled uniformly from a video file (PyAV), as PIL images."""
    import av
    import numpy as np

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for _ in container.decode(stream))
        wanted = set(np.linspace(0, max(total - 1, 0), min(frames, max(total, 1))).round().astype(int).tolist())
        container.seek(0)
        picked = [f.to_image() for i, f in enumerate(container.decode(stream)) if i in wanted]
    if not picked:
        raise ValueError(f"illava lmms-eval models: no frames could be read from {path}")
    return picked
