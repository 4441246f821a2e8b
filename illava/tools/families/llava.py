"""Tooling of LLaVA-1.5 (``LlavaForConditionalGeneration``): bundled and tiny configurations,
the image processor, stock inputs, pictures of patches, FLOPs dimensions."""

from __future__ import annotations

from ...adapters.llava import head_rows, patch_side
from .base import FamilyTools, FlopsDims, Panel, check_markers, placeholder, unnormalise
from .shared import (
    OPENAI_CLIP,
    VICUNA,
    clip_flops_dims,
    clip_vicuna,
    tiny_clip_llama,
)


class LlavaTools(FamilyTools):
    config_types = ("llava",)
    architectures = {
        "llava-1.5-7b": lambda: llava_config("7b"),
        "llava-1.5-13b": lambda: llava_config("13b"),
    }
    tiny = {"tiny-llava": lambda: tiny_llava_config(), "tiny-llava-dinov2": lambda: tiny_llava_dinov2_config()}

    def image_processor(self, config):
        """LLaVA-1.5's preprocessing: pad to a square with the mean colour, resize to the tower's size."""
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        size = config.vision_config.image_size
        mean, std = OPENAI_CLIP
        return LlavaImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_pad=True,
            image_mean=mean,
            image_std=std,
        )

    def tokens_per_image(self, config) -> int:
        return patch_side(config) ** 2 + head_rows(config)

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """LLaVA batch: every ``<image>`` marker becomes the stock number of placeholders (576 for
        LLaVA-1.5, +1 with the ``full`` strategy, + the registers of a DINOv2 tower); images are
        ordered as their markers."""
        from transformers import BatchFeature

        check_markers(prompts, images, videos, takes_video=False, family="LLaVA-1.5 (LlavaForConditionalGeneration)")
        token = placeholder(tokenizer, config.image_token_id, "<image>")
        count = self.tokens_per_image(config)
        texts = [p.replace("<image>", token * count) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if images:
            processor = image_processor or self.image_processor(config)
            data["pixel_values"] = processor(list(images), return_tensors="pt")["pixel_values"]
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        side, ps = patch_side(model.config), model.config.vision_config.patch_size
        mean, std = mean_std or OPENAI_CLIP
        grid = np.arange(side * side).reshape(side, side)
        pixels = inputs["pixel_values"]
        return [
            [Panel("image", unnormalise(pixels[n], mean, std), grid + n * side * side, ps)]
            for n in range(len(call.item_crops))
        ]

    def flops_dims(self, config) -> FlopsDims:
        return clip_flops_dims(config)


def llava_config(size: str = "7b"):
    """LLaVA-1.5 ``7b`` or ``13b`` with the published dimensions: CLIP ViT-L/14-336 read at layer -2
    without its CLS token (576 tokens per image), an mlp2x_gelu projector, Vicuna v1.5."""
    from transformers import LlavaConfig

    if size not in VICUNA:
        raise ValueError(f"unknown LLaVA-1.5 size {size!r}; choose one of {sorted(VICUNA)}")
    return clip_vicuna(LlavaConfig, size)


def tiny_llava_config(vocab_size: int = 256, **vision):
    """A LLaVA-1.5 small enough for CPU tests: 64 px images of 8x8 patches (64 tokens each, CLS
    dropped), a 6-layer CLIP read at layer -2 (merges allowed at layers 0-4) and a 4-layer Llama with
    grouped-query attention. Token ids match ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1)."""
    from transformers import LlavaConfig

    return tiny_clip_llama(LlavaConfig, vocab_size, vision)


def tiny_llava_dinov2_config(vocab_size: int = 256, registers: int = 2):
    """The tiny LLaVA-1.5 with a 6-layer DINOv2 tower in place of CLIP (``Dinov2WithRegistersModel``
    with ``registers`` register tokens; 0: ``Dinov2Model``): 64 px images of 8x8 patches, read at
    layer -2 without the CLS token (64 + ``registers`` tokens per image), layer scales of 0.5 (the
    MLP is ``intermediate_size`` wide, as ``mlp_ratio`` says)."""
    vision = {"model_type": "dinov2", "mlp_ratio": 2, "layerscale_value": 0.5}
    if registers:
        vision.update(model_type="dinov2_with_registers", num_register_tokens=registers)
    return tiny_llava_config(vocab_size, **vision)
