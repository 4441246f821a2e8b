"""Tooling of LLaVA-NeXT (LLaVA-1.6, ``LlavaNextForConditionalGeneration``): bundled and tiny
configurations, the image processor, stock inputs, pictures of AnyRes views, FLOPs dimensions."""

from __future__ import annotations

import torch
from transformers.models.llava_next import modeling_llava_next as mln

from .base import FamilyTools, FlopsDims, Panel, check_markers, placeholder, unnormalise
from .shared import (
    OPENAI_CLIP,
    anyres_panels,
    clip_flops_dims,
    clip_vicuna,
    tiny_clip_llama,
)


class LlavaNextTools(FamilyTools):
    config_types = ("llava_next",)
    counts_depend_on_weights = True  # survivors cut away by unpadding follow where they lie
    architectures = {"llava-v1.6-vicuna-7b": lambda: llava_next_config("vicuna-7b")}
    tiny = {"tiny-llava-next": lambda: tiny_llava_next_config()}

    def image_processor(self, config):
        """LLaVA-1.6's preprocessing (PIL backend): the base view resized to the tower's square, the
        image resized and padded to the best grid of ``image_grid_pinpoints`` and cut into crops."""
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        size = config.vision_config.image_size
        mean, std = OPENAI_CLIP
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            image_mean=mean,
            image_std=std,
        )

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """LLaVA-NeXT batch: every ``<image>`` marker becomes the stock number of placeholders for
        its image's size (``image_token_count``); images are ordered as their markers."""
        from transformers import BatchFeature

        check_markers(
            prompts, images, videos, takes_video=False, family="LLaVA-NeXT (LlavaNextForConditionalGeneration)"
        )
        texts, data = list(prompts), {}
        if images:
            processor = image_processor or self.image_processor(config)
            pix = processor(list(images), return_tensors="pt")
            data["pixel_values"], data["image_sizes"] = pix["pixel_values"], pix["image_sizes"]
            sizes = iter(pix["image_sizes"].tolist())
            token = placeholder(tokenizer, config.image_token_id, "<image>")
            texts = []
            for prompt in prompts:
                while "<image>" in prompt:
                    prompt = prompt.replace("<image>", "\0" * image_token_count(config, next(sizes)), 1)
                texts.append(prompt.replace("\0", token))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        span = side * vc.patch_size
        mean, std = mean_std or OPENAI_CLIP
        pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
        items, unit = [], 0
        for n, count in enumerate(call.item_crops):
            images = [unnormalise(v, mean, std)[:span, :span] for v in pixels[n][:count]]
            items.append(anyres_panels(model.config, images, sizes[n].tolist(), unit))
            unit += count * side**2
        return items

    def flops_dims(self, config) -> FlopsDims:
        return clip_flops_dims(config)


def image_token_count(config, image_size) -> int:
    """Placeholders stock transformers uses for one image of ``(height, width)`` pixels, computed by
    the stock ``pack_image_features`` on one-channel zeros (follows the installed transformers)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    crops = mln.image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vc.image_size)
    stub = type("Stub", (), {"config": config})()
    _, lens = mln.LlavaNextModel.pack_image_features(
        stub,
        [torch.zeros(crops, side * side, 1)],
        torch.tensor([list(image_size)]),
        config.vision_feature_select_strategy,
        torch.zeros(1),
    )
    return int(lens[0])


# LLaVA-1.6's grid: 2x1, 1x2, 2x2, 3x1 and 1x3 crops of 336 px
_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next_config(name: str = "vicuna-7b"):
    """LLaVA-1.6 with the published dimensions: CLIP ViT-L/14-336 read at layer -2 without its CLS
    token (576 tokens per view), an mlp2x_gelu projector, AnyRes over ``_PINPOINTS_336``, Vicuna
    v1.5 (llava-hf/llava-v1.6-vicuna-7b-hf: vocabulary 32064, ``<image>`` 32000)."""
    from transformers import LlavaNextConfig

    sizes = {"vicuna-7b": "7b"}
    if name not in sizes:
        raise ValueError(f"unknown LLaVA-1.6 model {name!r}; choose one of {sorted(sizes)}")
    return clip_vicuna(LlavaNextConfig, sizes[name], image_grid_pinpoints=[list(p) for p in _PINPOINTS_336])


def tiny_llava_next_config(vocab_size: int = 256, **vision):
    """A LLaVA-1.6 small enough for CPU tests: 64 px views of 8x8 patches (64 tokens each, CLS
    dropped) on LLaVA-1.6's grid shapes (2x1, 1x2, 2x2, 3x1, 1x3 crops), a 6-layer CLIP read at
    layer -2 (merges allowed at layers 0-4) and a 4-layer Llama with grouped-query attention.
    Token ids match ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1)."""
    from transformers import LlavaNextConfig

    pinpoints = [[h * 64 // 336, w * 64 // 336] for h, w in _PINPOINTS_336]
    return tiny_clip_llama(LlavaNextConfig, vocab_size, vision, image_grid_pinpoints=pinpoints)
