"""The family records: what illava knows of every model family it serves, as data and pure functions
of a Hugging Face *configuration* (never of a model, never of an engine). Both engines read them:
the transformers backend's adapters (``illava.adapters``) and the vLLM plugin (``illava.vllm``);
``illava.presets.preset`` scales a record's preset table to a configuration for both, and
``IllavaConfig.from_preset`` reads the tables without any engine.

A record (``Record``) says:

- which configurations and model classes it matches (``model_types``, ``model_classes``);
- its merging unit (``unit``: 1 for a patch, 4 for a 2x2 block a patch merger or a pixel shuffle
  folds into one LLM token, 16 for a 4x4 block a pooling folds; ``dimensions(config).unit`` where the
  configuration decides it, Qwen-VL's ``spatial_merge_size**2``);
- the leading encoder tokens of a crop that are never removed (``keep_first``: a CLS token;
  ``keep_first_of(config)`` where the configuration decides it, DINOv2's registers);
- how positions follow the survivors (``renumber_positions``: as if the prompt had fewer
  placeholders, or the survivors' own positions, M-RoPE);
- which encoder layers can merge (``mergeable_layers(config)``: up to the feature layer; Qwen2.5-VL
  only at its full-attention blocks);
- its preset table (``presets``: config type -> the reference dimensions the settings were chosen
  for and the ``image`` / ``video`` settings) and how a scaled preset is adjusted to a configuration
  (``adjust_preset``: Qwen2.5-VL's snap to full-attention blocks, Gemma 3's LLM layers after a
  global-attention layer; ``llm_stage_in_presets``: Qwen-VL's small models have none);
- which inputs it takes (``inputs``: ``image``, ``multi-image``, ``video``);
- its dimensions (``dimensions(config)``: encoder depth, tokens per crop, LLM depth, feature layer,
  unit), the numbers every configuration is checked against.

No transformers and no torch here: the configurations are read by attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Dimensions:
    encoder_depth: int
    tokens_per_crop: int  # 0: dynamic resolution, checked per frame at run time
    llm_depth: int
    feature_layer: int  # last encoder layer whose output the model reads
    unit: int = 1

    def as_dict(self) -> dict:
        return vars(self).copy()


@dataclass(frozen=True, eq=False)
class Record:
    """One model family (module docstring). The callables take a Hugging Face configuration. One
    record per family: records compare (and hash) by identity."""

    name: str  # how messages name the family
    model_types: tuple[str, ...]  # ``config.model_type`` values it matches
    model_classes: tuple[str, ...]  # transformers model classes it serves
    inputs: tuple[str, ...]  # "image", "multi-image", "video"
    unit: int  # tokens removed together in the family's releases
    keep_first: int  # leading tokens of a crop never removed in the family's releases (a CLS token: 1)
    renumber_positions: bool  # survivors renumbered (True) or keep their own positions (M-RoPE: False)
    presets: Mapping[str, dict]  # config type -> {"reference": dims, "image": settings, "video": settings}
    measure: Callable[[Any], Dimensions]  # the dimensions of a configuration
    names: Mapping[str, str] = field(default_factory=dict)  # config type -> name, where they differ
    leading: Callable[[Any], int] | None = None  # keep_first of a configuration, where it decides
    merge_only_at: Callable[[Any], tuple[int, ...] | None] | None = None  # layers the merges are limited to
    llm_stage: Callable[[Any], bool] | None = None  # whether presets have an LLM stage (default: yes)
    adjust: Callable[[Any, Any], Any] | None = None  # (config, scaled IllavaConfig) -> adjusted

    def dimensions(self, hf_config) -> Dimensions:
        return self.measure(hf_config)

    def keep_first_of(self, hf_config) -> int:
        return self.leading(hf_config) if self.leading is not None else self.keep_first

    def mergeable_layers(self, hf_config) -> tuple[int, ...]:
        """The encoder layers where the encoder stage may merge (up to the feature layer)."""
        layers = range(self.dimensions(hf_config).feature_layer + 1)
        allowed = self.merge_only_at(hf_config) if self.merge_only_at is not None else None
        return tuple(layer for layer in layers if allowed is None or layer in allowed)

    def llm_stage_in_presets(self, hf_config) -> bool:
        return self.llm_stage(hf_config) if self.llm_stage is not None else True

    def table(self, model_type: str) -> dict:
        return self.presets[model_type]

    def adjust_preset(self, hf_config, config):
        """A preset scaled to ``hf_config`` adjusted to it (an ``IllavaConfig``; default: as it is)."""
        return self.adjust(hf_config, config) if self.adjust is not None else config

    def label(self, model_type: str) -> str:
        return self.names.get(model_type, self.name)

    @property
    def takes_video(self) -> bool:
        return "video" in self.inputs


# ---------------------------------------------------------------------------- dimensions
def vit_dimensions(hf_config, unit: int = 1) -> Dimensions:
    """Dimensions of a configuration whose vision tower (``num_hidden_layers``, square ``image_size``
    of ``patch_size`` patches) is read at ``vision_feature_layer`` (one layer or several)."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    depth = vc.num_hidden_layers
    layers = hf_config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    # hidden_states[i] is the output of layer i-1; a merge at layer l changes outputs >= l, and
    # every selected hidden state must see the same tokens
    feature_layer = min(layer % (depth + 1) for layer in layers) - 1
    return Dimensions(depth, (vc.image_size // vc.patch_size) ** 2, tc.num_hidden_layers, feature_layer, unit=unit)


def registers(vision_config) -> int:
    """Register tokens of a DINOv2 tower (after the CLS token, before the patches; 0 for others)."""
    if getattr(vision_config, "model_type", None) == "dinov2_with_registers":
        return int(vision_config.num_register_tokens)
    return 0


def qwen_vl_dimensions(hf_config) -> Dimensions:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: dynamic resolution, merges up to the last block, units of
    ``spatial_merge_size**2`` patches (the patch merger's blocks)."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    return Dimensions(vc.depth, 0, tc.num_hidden_layers, vc.depth - 1, unit=vc.spatial_merge_size**2)


def internvl_patch_side(hf_config) -> int:
    vc = hf_config.vision_config
    return vc.image_size[0] // vc.patch_size[0]


def internvl_dimensions(hf_config) -> Dimensions:
    vc, tc = hf_config.vision_config, hf_config.text_config
    depth = vc.num_hidden_layers
    # hidden_states[i] is the output of layer i-1; a merge at layer l changes outputs >= l
    feature_layer = hf_config.vision_feature_layer % (depth + 1) - 1
    return Dimensions(depth, internvl_patch_side(hf_config) ** 2, tc.num_hidden_layers, feature_layer, unit=4)


GEMMA3_KERNEL = 4  # the pooling of every released Gemma 3: 64x64 patches -> 16x16 tokens
GEMMA3_UNIT = GEMMA3_KERNEL * GEMMA3_KERNEL


def gemma3_geometry(hf_config) -> tuple[int, int]:
    """(patches per side, pooling kernel) of a Gemma 3 image."""
    vc = hf_config.vision_config
    side = vc.image_size // vc.patch_size
    return side, side // int(hf_config.mm_tokens_per_image**0.5)


def gemma3_dimensions(hf_config) -> Dimensions:
    vc, tc = hf_config.vision_config, hf_config.text_config
    side, _ = gemma3_geometry(hf_config)
    depth = vc.num_hidden_layers
    return Dimensions(depth, side * side, tc.num_hidden_layers, depth - 1, unit=GEMMA3_UNIT)


# ---------------------------------------------------------------------------- preset rules
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


def qwen_vl_full_attention(hf_config) -> tuple[int, ...] | None:
    """Qwen2.5-VL's full-attention blocks (``fullatt_block_indexes``), where it alone may merge: only
    there is the received attention a score over the whole frame. ``None`` for the others."""
    if hf_config.model_type != "qwen2_5_vl":
        return None
    return tuple(hf_config.vision_config.fullatt_block_indexes)


def _snap_to_full_attention(hf_config, config):
    full = qwen_vl_full_attention(hf_config)
    if full is None or not config.encoder_layers:
        return config
    # scaled preset layers snap to the nearest full-attention blocks
    return config.replace(encoder_layers=snap_to_blocks(config.encoder_layers, full))


def _qwen_llm_stage(hf_config) -> bool:
    return qwen_vl_llm_stage(hf_config.text_config.hidden_size)


def _after_global_attention(hf_config, config):
    """Gemma 3: LLM merge layers move to the nearest layer that follows a global-attention layer
    (ties: the earlier one), so that the scoring query sees the whole prompt."""
    types = getattr(hf_config.text_config, "layer_types", None) or []
    after_global = [i + 1 for i, t in enumerate(types) if t == "full_attention" and i + 1 < len(types)]
    if not config.llm_layers or not after_global:
        return config
    moved = tuple(dict.fromkeys(min(after_global, key=lambda k: (abs(k - layer), k)) for layer in config.llm_layers))
    if len(moved) != len(config.llm_layers):
        return config
    return config.replace(llm_layers=moved)


# ---------------------------------------------------------------------------- the records
IMAGES = ("image", "multi-image")
IMAGES_AND_VIDEO = ("image", "multi-image", "video")

# Preset tables: "reference" are the dimensions the settings were chosen for; a table without a
# "video" entry uses its "image" settings for videos (the family takes no video). Where the settings
# come from: docs/method.md and each adapter's docstring.

LLAVA = Record(
    name="LLaVA-1.5",
    model_types=("llava",),
    model_classes=("LlavaForConditionalGeneration",),
    inputs=IMAGES,
    unit=1,
    keep_first=1,  # CLIP's CLS token; DINOv2: CLS + registers
    renumber_positions=True,
    # reference: LLaVA-1.5-7B (CLIP ViT-L/14-336, 24 layers, 576 patches; Vicuna-7B, 32 layers)
    presets={
        "llava": {
            "reference": {"encoder_depth": 24, "tokens_per_crop": 576, "llm_depth": 32},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 72, "llm_layers": (9,),
                      "llm_keep_ratio": 0.7},
        }
    },
    measure=vit_dimensions,
    leading=lambda hf_config: 1 + registers(hf_config.vision_config),
)  # fmt: skip

LLAVA_NEXT = Record(
    name="LLaVA-NeXT",
    model_types=("llava_next",),
    model_classes=("LlavaNextForConditionalGeneration",),
    inputs=IMAGES,
    unit=1,
    keep_first=1,  # CLIP's CLS token, in the encoder only (dropped by the "default" strategy)
    renumber_positions=True,
    # reference: LLaVA-1.6-Vicuna-7B (CLIP ViT-L/14-336, 24 layers, 576 patches per view; Vicuna-7B, 32 layers)
    presets={
        "llava_next": {
            "reference": {"encoder_depth": 24, "tokens_per_crop": 576, "llm_depth": 32},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 72, "llm_layers": (9,),
                      "llm_keep_ratio": 0.7},
        }
    },
    measure=vit_dimensions,
)  # fmt: skip

LLAVA_ONEVISION = Record(
    name="LLaVA-OneVision",
    model_types=("llava_onevision",),
    model_classes=("LlavaOnevisionForConditionalGeneration",),
    inputs=IMAGES_AND_VIDEO,
    unit=1,
    keep_first=0,  # SigLIP: no CLS token
    renumber_positions=True,
    # the authors' settings for LLaVA-OneVision-7B (docs/method.md)
    presets={
        "llava_onevision": {
            "reference": {"encoder_depth": 26, "tokens_per_crop": 729, "llm_depth": 28},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 92, "llm_layers": (8,),
                      "llm_keep_ratio": 0.7},
            "video": {"encoder_layers": (3, 4, 5, 6), "encoder_removal": 92, "llm_layers": (2,),
                      "llm_keep_ratio": 0.7},
        }
    },
    measure=vit_dimensions,
)  # fmt: skip

QWEN_VL = Record(
    name="Qwen2-VL",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    model_classes=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    names={"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"},
    inputs=IMAGES_AND_VIDEO,
    unit=4,  # a 2x2 block (the patch merger's)
    keep_first=0,
    renumber_positions=False,  # the survivors keep their own M-RoPE positions
    presets={
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
    },
    measure=qwen_vl_dimensions,
    merge_only_at=qwen_vl_full_attention,
    llm_stage=_qwen_llm_stage,
    adjust=_snap_to_full_attention,
)  # fmt: skip

# Our choice, by the principle of Qwen2-VL-7B's published settings (blocks 12-15 of 32 remove 16%
# each; LLM layers 6, 7, 8 of 28 keep 0.9): the same relative depths in Qwen3-VL-8B (27 blocks, 36
# decoder layers). Merges after deepstack block 8 recycle the deepstack features alike.
_QWEN3_VL_TABLE = {
    "reference": {"encoder_depth": 27, "tokens_per_crop": 0, "llm_depth": 36},
    "image": {"encoder_layers": (10, 11, 12, 13), "encoder_removal": 0.16,
              "llm_layers": (8, 9, 10), "llm_keep_ratio": 0.9},
}  # fmt: skip

QWEN3_VL = Record(
    name="Qwen3-VL",
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    model_classes=("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
    inputs=IMAGES_AND_VIDEO,
    unit=4,
    keep_first=0,
    renumber_positions=False,  # interleaved M-RoPE: the survivors keep their own positions
    presets={"qwen3_vl": _QWEN3_VL_TABLE, "qwen3_vl_moe": _QWEN3_VL_TABLE},
    measure=qwen_vl_dimensions,
    llm_stage=_qwen_llm_stage,
)

INTERNVL = Record(
    name="InternVL",
    model_types=("internvl",),
    model_classes=("InternVLForConditionalGeneration",),
    inputs=IMAGES_AND_VIDEO,
    unit=4,  # a 2x2 block (the pixel shuffle's)
    keep_first=1,  # InternViT's CLS token
    renumber_positions=True,
    # reference: InternVL2.5-8B (InternViT-300M, 24 layers, 1024 patches per tile; 32 decoder layers)
    presets={
        "internvl": {
            "reference": {"encoder_depth": 24, "tokens_per_crop": 1024, "llm_depth": 32},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 128, "llm_layers": (9,),
                      "llm_keep_ratio": 0.7},
            "video": {"encoder_layers": (3, 4, 5, 6), "encoder_removal": 128, "llm_layers": (2,),
                      "llm_keep_ratio": 0.7},
        }
    },
    measure=internvl_dimensions,
)  # fmt: skip

GEMMA3 = Record(
    name="Gemma 3",
    model_types=("gemma3",),
    model_classes=("Gemma3ForConditionalGeneration",),
    inputs=IMAGES,
    unit=GEMMA3_UNIT,  # a 4x4 block (the pooling's)
    keep_first=0,
    renumber_positions=True,
    # reference: Gemma-3-4B (SigLIP 27 layers at 896 px, 4096 patches; 34 decoder layers)
    presets={
        "gemma3": {
            "reference": {"encoder_depth": 27, "tokens_per_crop": 4096, "llm_depth": 34},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 512, "llm_layers": (12,),
                      "llm_keep_ratio": 0.7},
        }
    },
    measure=gemma3_dimensions,
    adjust=_after_global_attention,
)  # fmt: skip

# one line per family
RECORDS: tuple[Record, ...] = (LLAVA_ONEVISION, QWEN_VL, QWEN3_VL, INTERNVL, LLAVA, LLAVA_NEXT, GEMMA3)


def record_for(model_type: str) -> Record:
    """The record of a model type (``config.model_type``); ``TypeError`` if no family has it."""
    for record in RECORDS:
        if model_type in record.model_types:
            return record
    supported = sorted(t for r in RECORDS for t in r.model_types)
    raise TypeError(f"illava does not support model type {model_type!r}; supported: {', '.join(supported)}")
