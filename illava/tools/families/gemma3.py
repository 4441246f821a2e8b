"""Tooling of Gemma 3 (``Gemma3ForConditionalGeneration``): bundled and tiny configurations, the
image processor, stock inputs, pictures of 4x4 blocks, FLOPs dimensions."""

from __future__ import annotations

from ...adapters.gemma3 import geometry
from .base import FamilyTools, FlopsDims, LayerDims, Panel, check_markers, placeholder, unnormalise

GEMMA_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class Gemma3Tools(FamilyTools):
    config_types = ("gemma3",)
    architectures = {
        "gemma-3-4b": lambda: gemma3_config("4b"),
        "gemma-3-27b": lambda: gemma3_config("27b"),
    }
    tiny = {"tiny-gemma3": lambda: tiny_gemma3_config()}

    def image_processor(self, config):
        """Gemma 3's preprocessing: resize to the tower's square (bilinear), scale to [-1, 1]; no
        pan-and-scan."""
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        size = config.vision_config.image_size
        mean, std = GEMMA_MEAN_STD
        return Gemma3ImageProcessorPil(
            size={"height": size, "width": size}, image_mean=mean, image_std=std, do_pan_and_scan=False
        )

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """Gemma 3 batch as its processor makes it: every ``<image>`` marker becomes
        ``\\n\\n<start_of_image>`` + 256 image tokens + ``<end_of_image>\\n\\n``; ``token_type_ids``
        mark the image tokens (the bidirectional blocks)."""
        from transformers import BatchFeature

        check_markers(prompts, images, videos, takes_video=False, family="Gemma 3 (Gemma3ForConditionalGeneration)")
        token = placeholder(tokenizer, config.image_token_id, "<image>")
        boi = placeholder(tokenizer, config.boi_token_id, "<|vision_start|>")
        eoi = placeholder(tokenizer, config.eoi_token_id, "<|vision_end|>")
        span = f"\n\n{boi}{token * config.mm_tokens_per_image}{eoi}\n\n"
        texts = [p.replace("<image>", span) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        ids = enc["input_ids"]
        data = {
            "input_ids": ids,
            "attention_mask": enc["attention_mask"],
            "token_type_ids": (ids == config.image_token_id).long(),
        }
        if images:
            processor = image_processor or self.image_processor(config)
            data["pixel_values"] = processor(list(images), return_tensors="pt")["pixel_values"]
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        side, kernel = geometry(model.config)
        blocks = side // kernel
        mean, std = mean_std or GEMMA_MEAN_STD
        grid = np.arange(blocks * blocks).reshape(blocks, blocks)
        cell = kernel * model.config.vision_config.patch_size
        pixels = inputs["pixel_values"]
        return [
            [Panel("image", unnormalise(pixels[n], mean, std), grid + n * blocks * blocks, cell)]
            for n in range(len(call.item_crops))
        ]

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        _, kernel = geometry(config)
        return FlopsDims(
            encoder=LayerDims.of_vit(vc),
            encoder_depth=vc.num_hidden_layers,
            # one linear map per pooled token (a 4x4 block of encoder tokens)
            projector_macs_per_token=vc.hidden_size * tc.hidden_size / (kernel * kernel),
            text=LayerDims.of_decoder(tc),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
        )


# SigLIP-So400m/14 at 896 px, the vision tower of every Gemma 3 with vision (4B, 12B, 27B)
_SIGLIP_896 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}
_GEMMA3_TEXT = {
    "4b": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256},
    "27b": {"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
            "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168},
}  # fmt: skip
_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def gemma3_config(size: str = "4b"):
    """Gemma 3 ``4b`` or ``27b`` (google/gemma-3-*-it) with the published dimensions: SigLIP-So400m
    at 896 px (4096 patches) pooled 4x4 to 256 tokens per image; sliding window 1024 on 5 of every 6
    decoder layers; RoPE 10k local, 1M global with linear scaling 8."""
    from transformers import Gemma3Config

    if size not in _GEMMA3_TEXT:
        raise ValueError(f"unknown Gemma 3 size {size!r}; choose one of {sorted(_GEMMA3_TEXT)}")
    text = {"model_type": "gemma3_text", "vocab_size": 262_208, "max_position_embeddings": 131_072,
            "rms_norm_eps": 1e-6, "sliding_window": 1024, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {k: dict(v) for k, v in _ROPE.items()}, **_GEMMA3_TEXT[size]}  # fmt: skip
    return Gemma3Config(
        vision_config=dict(_SIGLIP_896),
        text_config=text,
        mm_tokens_per_image=256,
        boi_token_index=255_999,
        eoi_token_index=256_000,
        image_token_index=262_144,
    )


def tiny_gemma3_config(vocab_size: int = 256, sliding_window: int = 8):
    """A Gemma 3 small enough for CPU tests: 64 px images of 4 px patches (16x16 patches pooled 4x4
    to 16 tokens, the released kernel), a 4-layer SigLIP, a 4-layer decoder with layer types
    sliding, global, sliding, global and a window of ``sliding_window`` tokens (shorter than any
    prompt with an image). Token ids match ``illava.tools.inputs.word_tokenizer``: image 1,
    ``<start_of_image>`` 6 (``<|vision_start|>``), ``<end_of_image>`` 7 (``<|vision_end|>``)."""
    from transformers import Gemma3Config

    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 64, "patch_size": 4,
              "vision_use_head": False}  # fmt: skip
    text = {
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": sliding_window,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "max_position_embeddings": 4096,
        "rope_parameters": {k: dict(v) for k, v in _ROPE.items()},
    }
    return Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=16,
        boi_token_index=6,
        eoi_token_index=7,
        image_token_index=1,
    )
