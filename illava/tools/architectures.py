"""Bundled architectures (published dimensions) and tiny test configurations, from the families'
tooling (``illava.tools.families``).

Random weights are enough for token counts, FLOPs and timing: compute does not depend on the weight
values. Nothing here downloads anything.
"""

from __future__ import annotations

import torch

from .families import FAMILIES


def architectures() -> dict:
    """name -> config factory of every bundled architecture (published dimensions)."""
    return {name: factory for family in FAMILIES for name, factory in family.architectures.items()}


def tiny_configs() -> dict:
    return {name: factory for family in FAMILIES for name, factory in family.tiny.items()}


def tiny_config(name: str):
    """A small configuration of a family for CPU tests and demos (``FamilyTools.tiny``)."""
    configs = tiny_configs()
    if name not in configs:
        raise ValueError(f"unknown tiny configuration {name!r}; choose one of {sorted(configs)}")
    return configs[name]()


# widths cut by ``narrow``: (attribute, value); heads stay a divisor of the width
_NARROW = (
    ("hidden_size", 64), ("intermediate_size", 128), ("num_attention_heads", 2), ("num_key_value_heads", 1),
    ("head_dim", 32), ("embed_dim", 64), ("num_heads", 2), ("out_hidden_size", 64),
)  # fmt: skip


def build_architecture(
    name: str,
    dtype=None,
    device=None,
    llm_layers: int | None = None,
    vision_layers: int | None = None,
    narrow: bool = False,
):
    """A model of a bundled architecture with random weights (no download).

    ``llm_layers`` / ``vision_layers`` keep only the first decoder / vision-encoder layers (token
    counts do not depend on layers after the last merge layer of a stage, when the model reads the
    encoder's last layer); ``narrow`` cuts every width to a few dozen, keeping depths, patch and
    image sizes (token counts do not depend on widths); ``device="meta"`` builds without memory.
    """
    from transformers import AutoModelForImageTextToText

    known = architectures()
    if name not in known:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(known)}")
    config = known[name]()
    if llm_layers is not None:
        config.text_config.num_hidden_layers = llm_layers
        if getattr(config.text_config, "layer_types", None) is not None:
            config.text_config.layer_types = config.text_config.layer_types[:llm_layers]
    if vision_layers is not None:
        vision = config.vision_config
        setattr(vision, "depth" if hasattr(vision, "depth") else "num_hidden_layers", vision_layers)
    if narrow:
        for part in (config.vision_config, config.text_config):
            for attribute, value in _NARROW:
                if getattr(part, attribute, None) is not None:
                    setattr(part, attribute, value)
            if getattr(part, "mrope_section", None) is not None or "mrope_section" in (
                getattr(part, "rope_scaling", None) or {}
            ):
                _narrow_mrope(part)
    with torch.device(device or "cpu"):
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForImageTextToText.from_config(config, **kwargs)
    return model.eval()


def _narrow_mrope(text_config) -> None:
    """M-RoPE sections must add up to half the head width: scale them to ``head_dim`` 32."""
    for holder in (
        text_config,
        getattr(text_config, "rope_scaling", None),
        getattr(text_config, "rope_parameters", None),
    ):
        if isinstance(holder, dict) and "mrope_section" in holder:
            holder["mrope_section"] = [4, 6, 6]
        elif holder is not None and getattr(holder, "mrope_section", None) is not None:
            holder.mrope_section = [4, 6, 6]
