"""A preset scaled to a model configuration, the same for both engines: the family record's table
(``illava.families``) scaled to the configuration's dimensions (``illava.config.scale_preset``), then
adjusted to it by the record (Qwen2.5-VL's full-attention blocks, Gemma 3's global-attention layers).
The transformers backend's adapters (``illava.adapters``) and the vLLM plugin (``illava.vllm``) both
call ``preset``, so a preset means the same in both. No transformers, no engine here.
"""

from __future__ import annotations

from .config import IllavaConfig, scale_preset
from .families import Record, qwen_vl_llm_stage, record_for, snap_to_blocks

__all__ = ["preset", "qwen_vl_llm_stage", "snap_to_blocks"]


def preset(hf_config, name: str, record: Record | None = None) -> IllavaConfig:
    """The preset ``name`` (``illava.config.PRESETS``) of the family of ``hf_config`` (a Hugging Face
    model configuration; ``record``: its family, by default the record of its ``model_type``) scaled to
    the configuration's dimensions and adjusted to it."""
    record = record or record_for(hf_config.model_type)
    dims = record.dimensions(hf_config)
    config = scale_preset(
        name,
        record.table(hf_config.model_type),
        encoder_depth=dims.encoder_depth,
        tokens_per_crop=dims.tokens_per_crop,
        llm_depth=dims.llm_depth,
        llm_stage=record.llm_stage_in_presets(hf_config),
        unit=dims.unit,
    )
    return record.adjust_preset(hf_config, config)
