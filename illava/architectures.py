"""Configurations of real architectures (published dimensions) and of tiny test models.

Random weights are enough for token counts, FLOPs and timing: compute does not depend on the
weight values. Nothing here downloads anything.
"""

from __future__ import annotations

from transformers import LlavaOnevisionConfig

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
    "0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 152000,
        "tie_word_embeddings": True,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152128,
        "tie_word_embeddings": False,
    },
    "72b": {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 152128,
        "tie_word_embeddings": False,
    },
}


def _pinpoints(base: int, max_tiles: int = 6) -> list[list[int]]:
    return [[base * i, base * j] for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)]


def llava_onevision_config(size: str = "0.5b") -> LlavaOnevisionConfig:
    """LLaVA-OneVision-Qwen2 ``0.5b``, ``7b`` or ``72b`` with the published dimensions."""
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


def tiny_llava_onevision_config(
    vocab_size: int = 256, image_token_id: int = 1, video_token_id: int = 2, **vision
) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision small enough for CPU tests: 64 px crops of 8x8 patches (64 tokens each),
    a 6-layer SigLIP and a 4-layer Qwen2 with grouped-query attention."""
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
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_pinpoints(vision_config["image_size"], 3),
        tie_word_embeddings=True,
    )
