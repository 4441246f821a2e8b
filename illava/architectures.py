"""Configurations of real architectures (published dimensions) and of tiny test models.

Random weights are enough for token counts, FLOPs and timing: compute does not depend on the
weight values. Nothing here downloads anything.
"""

from __future__ import annotations

import torch
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


_QWEN2_TEXT = {
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "2b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "3b": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}
_QWEN_TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def _qwen_text(size: str) -> dict:
    dims = dict(_QWEN2_TEXT[size])
    return {
        **dims,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }


def qwen2_vl_config(size: str = "7b"):
    """Qwen2-VL ``2b`` or ``7b`` with the published dimensions (675M-parameter ViT, 32 blocks)."""
    from transformers import Qwen2VLConfig

    if size not in ("2b", "7b"):
        raise ValueError(f"unknown Qwen2-VL size {size!r}; choose 2b or 7b")
    text = _qwen_text(size)
    vision = {
        "depth": 32,
        "embed_dim": 1280,
        "num_heads": 16,
        "mlp_ratio": 4,
        "hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=text["tie_word_embeddings"], **_QWEN_TOKENS
    )


def qwen2_5_vl_config(size: str = "7b"):
    """Qwen2.5-VL ``3b`` or ``7b`` with the published dimensions (windowed ViT, 32 blocks)."""
    from transformers import Qwen2_5_VLConfig

    if size not in ("3b", "7b"):
        raise ValueError(f"unknown Qwen2.5-VL size {size!r}; choose 3b or 7b")
    text = _qwen_text(size)
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": text["hidden_size"],
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=text["tie_word_embeddings"], **_QWEN_TOKENS
    )


def tiny_qwen_vl_config(version: str = "2", vocab_size: int = 256):
    """A Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) small enough for CPU tests; token ids
    match ``illava.inputs.word_tokenizer`` (image 1, video 2, vision start 6, vision end 7)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    tokens = {"image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 6, "vision_end_token_id": 7}
    if version == "2":
        vision = {
            "depth": 4,
            "embed_dim": 32,
            "num_heads": 4,
            "mlp_ratio": 2,
            "hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **tokens)
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 64,
        "window_size": 112,
        "fullatt_block_indexes": [1, 3],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **tokens)


# name -> (config factory, model class name); used by the benchmarks and `illava bench --arch`
ARCHITECTURES = {
    "llava-onevision-qwen2-0.5b": (lambda: llava_onevision_config("0.5b"), "LlavaOnevisionForConditionalGeneration"),
    "llava-onevision-qwen2-7b": (lambda: llava_onevision_config("7b"), "LlavaOnevisionForConditionalGeneration"),
    "llava-onevision-qwen2-72b": (lambda: llava_onevision_config("72b"), "LlavaOnevisionForConditionalGeneration"),
    "qwen2-vl-2b": (lambda: qwen2_vl_config("2b"), "Qwen2VLForConditionalGeneration"),
    "qwen2-vl-7b": (lambda: qwen2_vl_config("7b"), "Qwen2VLForConditionalGeneration"),
    "qwen2.5-vl-3b": (lambda: qwen2_5_vl_config("3b"), "Qwen2_5_VLForConditionalGeneration"),
    "qwen2.5-vl-7b": (lambda: qwen2_5_vl_config("7b"), "Qwen2_5_VLForConditionalGeneration"),
}


def build_architecture(name: str, dtype=None, device=None, llm_layers: int | None = None):
    """A model of a bundled architecture with random weights (no download).

    ``llm_layers`` keeps only the first decoder layers (token counts of layers beyond the last LLM
    merge layer do not depend on them); ``device="meta"`` builds without memory.
    """
    import transformers

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    factory, class_name = ARCHITECTURES[name]
    config = factory()
    if llm_layers is not None:
        config.text_config.num_hidden_layers = llm_layers
        config.text_config.layer_types = config.text_config.layer_types[:llm_layers]
    cls = getattr(transformers, class_name)
    with torch.device(device or "cpu"):
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls(config)
    return model.eval()
