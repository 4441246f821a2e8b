"""The families the plugin serves, read from their records (``illava.families``): the same
dimensions, merge layers and presets as the transformers backend's adapters, from the model
configuration vLLM loads (no vLLM, no transformers backend here)."""

from __future__ import annotations

from ..families import record_for
from .config import Family


def family(hf_config) -> Family:
    """The ``Family`` of a served model's configuration, from the record of its ``model_type``."""
    record = record_for(hf_config.model_type)
    dims = record.dimensions(hf_config)
    return Family(
        name=record.label(hf_config.model_type),
        model_type=hf_config.model_type,
        encoder_depth=dims.encoder_depth,
        tokens_per_crop=dims.tokens_per_crop,
        llm_depth=dims.llm_depth,
        feature_layer=dims.feature_layer,
        unit=dims.unit,
        mergeable=record.mergeable_layers(hf_config),
        hf_config=hf_config,
    )


def llava(hf_config) -> Family:
    """LLaVA-1.5 (``illava.families.LLAVA``)."""
    return family(hf_config)


def qwen_vl(hf_config) -> Family:
    """Qwen2-VL / Qwen2.5-VL (``illava.families.QWEN_VL``): 2x2 blocks, merges up to the last block;
    Qwen2.5-VL merges only at its full-attention blocks, where its presets snap to."""
    return family(hf_config)
