"""The dimensions of the families the plugin serves, read from a model configuration as the
transformers backend's adapters read them from a model (no vLLM, no transformers backend here)."""

from __future__ import annotations

from ..presets import LLAVA, QWEN_VL, qwen_vl_llm_stage
from .config import Family


def llava(hf_config) -> Family:
    """The dimensions of a LLaVA-1.5 configuration as the transformers backend reads them
    (``illava.adapters.llava_family.vit_dimensions``)."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    depth = vc.num_hidden_layers
    layers = hf_config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    feature_layer = min(layer % (depth + 1) for layer in layers) - 1
    return Family(
        name="LLaVA-1.5",
        model_type=hf_config.model_type,
        encoder_depth=depth,
        tokens_per_crop=(vc.image_size // vc.patch_size) ** 2,
        llm_depth=tc.num_hidden_layers,
        feature_layer=feature_layer,
        unit=1,
        table=LLAVA["llava"],
        mergeable=tuple(range(feature_layer + 1)),
    )


def qwen_vl(hf_config) -> Family:
    """Qwen2-VL / Qwen2.5-VL (``illava.adapters.qwen_vl``): 2x2 blocks, merges up to the last block;
    Qwen2.5-VL merges only at its full-attention blocks, where its presets snap to."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    windowed = hf_config.model_type == "qwen2_5_vl"
    full = tuple(vc.fullatt_block_indexes) if windowed else None
    return Family(
        name="Qwen2.5-VL" if windowed else "Qwen2-VL",
        model_type=hf_config.model_type,
        encoder_depth=vc.depth,
        tokens_per_crop=0,
        llm_depth=tc.num_hidden_layers,
        feature_layer=vc.depth - 1,
        unit=vc.spatial_merge_size**2,
        table=QWEN_VL[hf_config.model_type],
        mergeable=full if windowed else tuple(range(vc.depth)),
        llm_stage_in_presets=qwen_vl_llm_stage(tc.hidden_size),
        snap=full,
    )
