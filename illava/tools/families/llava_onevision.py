"""Tooling of LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): bundled and tiny
configurations, the image and video processing, stock inputs, pictures of AnyRes views and frames,
FLOPs dimensions."""

from __future__ import annotations

import math

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as mlo

from .base import FamilyTools, FlopsDims, LayerDims, Panel, check_markers, placeholder, unnormalise
from .shared import anyres_panels


class LlavaOnevisionTools(FamilyTools):
    config_types = ("llava_onevision",)
    counts_depend_on_weights = True  # row-end tokens and unpadding follow where survivors lie
    architectures = {
        "llava-onevision-qwen2-0.5b": lambda: llava_onevision_config("0.5b"),
        "llava-onevision-qwen2-7b": lambda: llava_onevision_config("7b"),
        "llava-onevision-qwen2-72b": lambda: llava_onevision_config("72b"),
    }

    def image_processor(self, config):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        size = config.vision_config.image_size
        return LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints]
        )

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        import numpy as np
        from transformers import BatchFeature

        processor = image_processor or self.image_processor(config)
        per_sample = [p.count("<image>") for p in prompts]
        check_markers(prompts, images, videos)
        data, texts = {}, list(prompts)
        if images:
            pix = processor(list(images), return_tensors="pt")
            data["pixel_values"], data["image_sizes"] = pix["pixel_values"], pix["image_sizes"]
            data["batch_num_images"] = torch.tensor([n for n in per_sample if n > 0])
            sizes = iter(pix["image_sizes"].tolist())
            token = placeholder(tokenizer, config.image_token_id, "<image>")
            texts = []
            for prompt, n in zip(prompts, per_sample):
                for _ in range(n):
                    count = image_token_count(config, next(sizes), single_crop=n > 1)
                    prompt = prompt.replace("<image>", "\0" * count, 1)
                texts.append(prompt.replace("\0", token))
        if videos:
            lengths = {len(v) for v in videos}
            if len(lengths) != 1:
                raise ValueError("all videos of a batch need the same number of frames")
            data["pixel_values_videos"] = torch.stack([video_pixels(v, processor, np) for v in videos])
            side = config.vision_config.image_size // config.vision_config.patch_size
            count = lengths.pop() * math.ceil(side / 2) ** 2 + 1
            token = placeholder(tokenizer, config.video_token_id, "<video>")
            texts = [t.replace("<video>", token * count) for t in texts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        vc = model.config.vision_config
        side, ps = vc.image_size // vc.patch_size, vc.patch_size
        span = side * ps
        processor = self.image_processor(model.config)
        mean, std = mean_std or (processor.image_mean, processor.image_std)
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        crops = [c for item in pixels for c in item] if kind == "video" else None
        grid = np.arange(side * side).reshape(side, side)
        items, unit = [], 0
        sizes = inputs.get("image_sizes")
        for n, count in enumerate(call.item_crops):
            views = crops[unit // side**2 : unit // side**2 + count] if kind == "video" else pixels[n][:count]
            images = [unnormalise(v, mean, std)[:span, :span] for v in views]
            if kind == "video":
                items.append([Panel(f"frame {f}", im, grid + unit + f * side**2, ps) for f, im in enumerate(images)])
            else:
                items.append(anyres_panels(model.config, images, sizes[n].tolist(), unit))
            unit += count * side**2
        return items

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        return FlopsDims(
            encoder=LayerDims.of_vit(vc),
            encoder_depth=vc.num_hidden_layers,
            projector_macs_per_token=vc.hidden_size * tc.hidden_size + tc.hidden_size * tc.hidden_size,
            text=LayerDims.of_decoder(tc),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
        )

    tiny = {"tiny-llava-onevision": lambda: tiny_llava_onevision_config()}


def image_token_count(config, image_size, single_crop: bool = False) -> int:
    """Placeholders stock transformers uses for one image of ``(height, width)`` pixels, computed
    by the stock ``pack_image_features`` on one-channel zeros (follows the installed transformers)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    crops = (
        1
        if single_crop
        else mlo.image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vc.image_size)
    )
    stub = type("Stub", (), {"config": config})()
    _, lens = mlo.LlavaOnevisionModel.pack_image_features(
        stub,
        [torch.zeros(crops, side * side, 1)],
        torch.tensor([list(image_size)]),
        torch.zeros(1),
        config.vision_aspect_ratio,
    )
    return int(lens[0])


def video_pixels(frames, processor, np) -> torch.Tensor:
    """``(frames, 3, H, W)`` as the LLaVA-OneVision video processor makes them: resized, normalised."""
    from PIL import Image

    size = processor.size
    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    out = []
    for frame in frames:
        img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
        img = img.convert("RGB").resize((size["width"], size["height"]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((arr - mean) / std)
    return torch.from_numpy(np.stack(out))


# SigLIP-so400m as used by LLaVA-OneVision (last layer removed: 26 layers), 384 px, patch 14.
_SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
_QWEN2 = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 152000, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152128, "tie_word_embeddings": False},
    "72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 152128, "tie_word_embeddings": False},
}  # fmt: skip


def _pinpoints(base: int, max_tiles: int = 6) -> list[list[int]]:
    return [[base * i, base * j] for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)]


def llava_onevision_config(size: str = "0.5b"):
    """LLaVA-OneVision-Qwen2 ``0.5b``, ``7b`` or ``72b`` with the published dimensions."""
    from transformers import LlavaOnevisionConfig

    if size not in _QWEN2:
        raise ValueError(f"unknown LLaVA-OneVision size {size!r}; choose one of {sorted(_QWEN2)}")
    text = {
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        **_QWEN2[size],
    }
    return LlavaOnevisionConfig(
        vision_config=dict(_SIGLIP_SO400M),
        text_config=text,
        image_token_id=151646,
        video_token_id=151647,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_pinpoints(384),
        tie_word_embeddings=_QWEN2[size]["tie_word_embeddings"],
    )


def tiny_llava_onevision_config(vocab_size: int = 256, **vision):
    """A LLaVA-OneVision small enough for CPU tests: 64 px crops of 8x8 patches (64 tokens each),
    a 6-layer SigLIP and a 4-layer Qwen2 with grouped-query attention. Token ids match
    ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1, ``<video>`` 2)."""
    from transformers import LlavaOnevisionConfig

    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
        "vision_use_head": False,
        **vision,
    }
    text_config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=1,
        video_token_id=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_pinpoints(vision_config["image_size"], 3),
        tie_word_embeddings=True,
    )
