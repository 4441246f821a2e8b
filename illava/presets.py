"""The preset tables of the families both backends serve, as data (no transformers): the reference
dimensions each family's settings were chosen for and the settings, scaled to a model by
``illava.config.scale_preset``. The transformers backend's adapters (``illava.adapters``) and the vLLM
plugin (``illava.vllm``) read the same tables, so a preset means the same in both.
"""

from __future__ import annotations

# LLaVA-1.5 (the reasons: illava.adapters.llava). Reference: LLaVA-1.5-7B (CLIP ViT-L/14-336, 24
# layers, 576 patches; Vicuna-7B, 32 layers). No "video" entry: LLaVA-1.5 takes no video.
LLAVA = {
    "llava": {
        "reference": {"encoder_depth": 24, "tokens_per_crop": 576, "llm_depth": 32},
        "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 72, "llm_layers": (9,), "llm_keep_ratio": 0.7},
    }
}

# Qwen2-VL / Qwen2.5-VL (illava.adapters.qwen_vl)
QWEN_VL = {
    # Qwen2-VL-7B, the authors' settings: blocks 12-15 remove 16% each; LLM layers 6, 7, 8 keep 0.9
    # (images and videos alike).
    "qwen2_vl": {
        "reference": {"encoder_depth": 32, "tokens_per_crop": 0, "llm_depth": 28},
        "image": {"encoder_layers": (12, 13, 14, 15), "encoder_removal": 0.16,
                  "llm_layers": (6, 7, 8), "llm_keep_ratio": 0.9},
    },
    # Qwen2.5-VL merges only at full-attention blocks (7, 15, 23, 31): two merges of 29% remove
    # about as much as Qwen2-VL's four of 16% (1 - 0.71^2 = 0.50 vs 1 - 0.84^4 = 0.50).
    "qwen2_5_vl": {
        "reference": {"encoder_depth": 32, "tokens_per_crop": 0, "llm_depth": 28},
        "image": {"encoder_layers": (7, 15), "encoder_removal": 0.29,
                  "llm_layers": (6, 7, 8), "llm_keep_ratio": 0.9},
    },
}  # fmt: skip


def qwen_vl_llm_stage(text_hidden_size: int) -> bool:
    """Whether Qwen-VL presets have an LLM stage: the authors turn it off for Qwen2-VL-2B (text
    width 1536)."""
    return text_hidden_size >= 2048


def snap_to_blocks(layers: tuple[int, ...], allowed) -> tuple[int, ...]:
    """Scaled preset layers moved to the nearest of the ``allowed`` blocks (Qwen2.5-VL: its
    full-attention blocks), each allowed block used once while some is left."""
    snapped: list[int] = []
    for layer in layers:
        options = [b for b in allowed if b not in snapped] or list(allowed)
        snapped.append(min(options, key=lambda b: abs(b - layer)))
    return tuple(dict.fromkeys(snapped))
