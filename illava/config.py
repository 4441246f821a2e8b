"""Configuration of the two iLLaVA stages, and the named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

RECYCLE_MODES = ("rank", "cluster", "prune")


@dataclass
class IllavaConfig:
    """What iLLaVA does to a model.

    Encoder stage: at each layer in ``encoder_layers`` (0-based, inside the vision transformer) the
    ``encoder_removal`` lowest-scored tokens of every crop / frame are removed and recycled into
    survivors. ``encoder_removal`` is either one value for every layer or one per layer; an ``int``
    is a token count, a ``float`` in (0, 1) a fraction of the tokens present at that layer. Qwen-VL
    removes whole 2x2 blocks: a count is rounded down to whole blocks, a fraction is of the blocks.

    LLM stage: before each decoder layer in ``llm_layers`` (prefill only) every visual span keeps
    ``llm_keep_ratio`` of its tokens (one value, or one per layer), scored by the attention the
    last prompt token pays them in the previous layer.

    ``recycle`` picks how removed tokens are folded into survivors: ``rank`` (paper v1),
    ``cluster`` (ICLR version; ``cluster_neighbours`` = M, ``cluster_fraction`` = share of kept
    tokens that act as recycling tokens) or ``prune`` (no recycling). ``enabled=False`` keeps
    the model patched but behaving exactly like stock transformers.
    """

    encoder_layers: tuple[int, ...] = ()
    encoder_removal: int | float | tuple[int | float, ...] = 0
    llm_layers: tuple[int, ...] = ()
    llm_keep_ratio: float | tuple[float, ...] = 1.0
    recycle: str = "rank"
    cluster_neighbours: int = 5
    cluster_fraction: float = 0.05
    enabled: bool = True
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.encoder_layers = _as_int_tuple(self.encoder_layers, "encoder_layers")
        self.llm_layers = _as_int_tuple(self.llm_layers, "llm_layers")
        if isinstance(self.encoder_removal, Sequence) and not isinstance(self.encoder_removal, str):
            self.encoder_removal = tuple(self.encoder_removal)
        if isinstance(self.llm_keep_ratio, Sequence) and not isinstance(self.llm_keep_ratio, str):
            self.llm_keep_ratio = tuple(float(v) for v in self.llm_keep_ratio)
        self._check_self()

    # ----------------------------------------------------------------- per-layer values
    def removal_at(self, layer: int) -> int | float:
        """The removal (count or fraction) configured for encoder layer ``layer``."""
        return _per_layer(self.encoder_removal, self.encoder_layers, layer)

    def keep_ratio_at(self, layer: int) -> float:
        """The keep ratio configured for decoder layer ``layer``."""
        return _per_layer(self.llm_keep_ratio, self.llm_layers, layer)

    @property
    def encoder_active(self) -> bool:
        return self.enabled and bool(self.encoder_layers)

    @property
    def llm_active(self) -> bool:
        return self.enabled and bool(self.llm_layers)

    def replace(self, **changes) -> IllavaConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- validation
    def _check_self(self) -> None:
        if self.recycle not in RECYCLE_MODES:
            raise ValueError(f"IllavaConfig.recycle must be one of {RECYCLE_MODES}, got {self.recycle!r}")
        if len(set(self.encoder_layers)) != len(self.encoder_layers):
            raise ValueError(f"IllavaConfig.encoder_layers has duplicates: {self.encoder_layers}")
        if len(set(self.llm_layers)) != len(self.llm_layers):
            raise ValueError(f"IllavaConfig.llm_layers has duplicates: {self.llm_layers}")
        if isinstance(self.encoder_removal, tuple) and len(self.encoder_removal) != len(self.encoder_layers):
            raise ValueError(
                f"IllavaConfig.encoder_removal has {len(self.encoder_removal)} values for "
                f"{len(self.encoder_layers)} encoder_layers; give one value or one per layer"
            )
        removals = self.encoder_removal if isinstance(self.encoder_removal, tuple) else (self.encoder_removal,)
        for r in removals:
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                raise ValueError(f"IllavaConfig.encoder_removal must be int or float, got {r!r}")
            if isinstance(r, int) and r < 0:
                raise ValueError(f"IllavaConfig.encoder_removal count must be >= 0, got {r}")
            if isinstance(r, float) and not 0.0 <= r < 1.0:
                raise ValueError(f"IllavaConfig.encoder_removal fraction must be in [0, 1), got {r}")
        if isinstance(self.llm_keep_ratio, tuple) and len(self.llm_keep_ratio) != len(self.llm_layers):
            raise ValueError(
                f"IllavaConfig.llm_keep_ratio has {len(self.llm_keep_ratio)} values for "
                f"{len(self.llm_layers)} llm_layers; give one value or one per layer"
            )
        ratios = self.llm_keep_ratio if isinstance(self.llm_keep_ratio, tuple) else (self.llm_keep_ratio,)
        for k in ratios:
            if not 0.0 < float(k) <= 1.0:
                raise ValueError(f"IllavaConfig.llm_keep_ratio must be in (0, 1], got {k}")
        if self.cluster_neighbours < 1:
            raise ValueError(f"IllavaConfig.cluster_neighbours must be >= 1, got {self.cluster_neighbours}")
        if not 0.0 < self.cluster_fraction <= 1.0:
            raise ValueError(f"IllavaConfig.cluster_fraction must be in (0, 1], got {self.cluster_fraction}")

    def check_against(self, *, encoder_depth: int, tokens_per_crop: int, llm_depth: int, feature_layer: int) -> None:
        """Validate layer indices and removals against a model's dimensions; raise ``ValueError``."""
        for layer in self.encoder_layers:
            if not 0 <= layer < encoder_depth:
                raise ValueError(
                    f"IllavaConfig.encoder_layers: layer {layer} is out of range; "
                    f"the vision encoder has layers 0..{encoder_depth - 1}"
                )
            if layer > feature_layer:
                raise ValueError(
                    f"IllavaConfig.encoder_layers: layer {layer} comes after the layer the model reads "
                    f"its visual features from ({feature_layer}); allowed 0..{feature_layer}"
                )
        n = tokens_per_crop  # 0: dynamic resolution, checked per image at run time
        for layer in sorted(self.encoder_layers) if n else ():
            r = removal_count(n, self.removal_at(layer))
            if r >= n:
                raise ValueError(
                    f"IllavaConfig.encoder_removal: removing {r} tokens at encoder layer {layer} leaves none "
                    f"of the {n} present; allowed 0..{n - 1}"
                )
            n -= r
        for layer in self.llm_layers:
            if not 1 <= layer < llm_depth:
                raise ValueError(
                    f"IllavaConfig.llm_layers: layer {layer} is out of range; allowed 1..{llm_depth - 1} "
                    "(layer k is scored by the attention of layer k-1)"
                )


def removal_count(n: int, removal: int | float) -> int:
    """Tokens to remove from ``n`` for a removal given as a count (int) or a fraction (float)."""
    if isinstance(removal, float):
        return int(n * removal + 0.5)
    return int(removal)


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept of ``n`` for a keep ratio; at least one token survives."""
    if n == 0:
        return 0
    return max(1, min(n, int(n * ratio + 0.5)))


def _as_int_tuple(values, name: str) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"IllavaConfig.{name} must be a sequence of layer indices, got {values!r}") from None
    if any(isinstance(v, bool) for v in values):
        raise ValueError(f"IllavaConfig.{name} must hold integers, got {values!r}")
    return out


def _per_layer(value, layers: tuple[int, ...], layer: int):
    if isinstance(value, tuple):
        return value[layers.index(layer)]
    return value


# ---------------------------------------------------------------------------------- presets
# Per model family: the authors' settings (METHOD.md) and the dimensions they were published for.
# Other depths scale the layer indices proportionally and integer removals with the tokens per crop,
# so LLaVA-OV-0.5B (24 LLM layers) and 72B (80) get sensible values.
_LLAVA_OV = {
    "reference": {"encoder_depth": 26, "tokens_per_crop": 729, "llm_depth": 28},
    "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 92, "llm_layers": (8,), "llm_keep_ratio": 0.70},
    "video": {"encoder_layers": (3, 4, 5, 6), "encoder_removal": 92, "llm_layers": (2,), "llm_keep_ratio": 0.70},
}
# Qwen2-VL-7B: encoder layers 12-15 remove 16% (whole 2x2 blocks) each; LLM layers 6, 7, 8 keep 0.9.
_QWEN2_VL = {
    "reference": {"encoder_depth": 32, "tokens_per_crop": 0, "llm_depth": 28},
    "image": {
        "encoder_layers": (12, 13, 14, 15),
        "encoder_removal": 0.16,
        "llm_layers": (6, 7, 8),
        "llm_keep_ratio": 0.9,
    },
}
_QWEN2_VL["video"] = _QWEN2_VL["image"]
# Qwen2.5-VL merges only at full-attention blocks (7, 15, 23, 31): two merges of 29% remove about as
# much as Qwen2-VL's four of 16% (1 - 0.71^2 = 0.50 vs 1 - 0.84^4 = 0.50).
_QWEN2_5_VL = {
    "reference": {"encoder_depth": 32, "tokens_per_crop": 0, "llm_depth": 28},
    "image": {"encoder_layers": (7, 15), "encoder_removal": 0.29, "llm_layers": (6, 7, 8), "llm_keep_ratio": 0.9},
}
_QWEN2_5_VL["video"] = _QWEN2_5_VL["image"]
FAMILY_PRESETS = {"llava_onevision": _LLAVA_OV, "qwen2_vl": _QWEN2_VL, "qwen2_5_vl": _QWEN2_5_VL}
PRESETS = ("image", "video", "encoder-only", "llm-only", "off")


def _preset_values(name: str, family: str) -> dict:
    table = FAMILY_PRESETS[family]
    if name in ("image", "video"):
        return dict(table[name])
    image = table["image"]
    if name == "encoder-only":
        return {"encoder_layers": image["encoder_layers"], "encoder_removal": image["encoder_removal"]}
    if name == "llm-only":
        return {"llm_layers": image["llm_layers"], "llm_keep_ratio": image["llm_keep_ratio"]}
    return {"enabled": False}


def preset(
    name: str,
    *,
    encoder_depth: int,
    tokens_per_crop: int,
    llm_depth: int,
    family: str = "llava_onevision",
    llm_stage: bool = True,
    **overrides,
) -> IllavaConfig:
    """The preset ``name`` of a model family scaled to a model of the given dimensions.

    ``llm_stage=False`` drops the LLM stage (the authors turn it off for Qwen2-VL-2B).
    ``overrides`` replace fields of the result.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown iLLaVA preset {name!r}; choose one of {list(PRESETS)}")
    reference = FAMILY_PRESETS[family]["reference"]
    values = _preset_values(name, family)
    if "encoder_layers" in values:
        values["encoder_layers"] = _scale_layers(values["encoder_layers"], reference["encoder_depth"], encoder_depth)
        if isinstance(values["encoder_removal"], int):
            scaled = values["encoder_removal"] * tokens_per_crop / reference["tokens_per_crop"]
            values["encoder_removal"] = max(1, round(scaled))
    if "llm_layers" in values:
        if llm_stage:
            values["llm_layers"] = _scale_layers(values["llm_layers"], reference["llm_depth"], llm_depth, minimum=1)
        else:
            del values["llm_layers"], values["llm_keep_ratio"]
    values.update(overrides)
    return IllavaConfig(preset=name, **values)


def _scale_layers(layers: tuple[int, ...], ref_depth: int, depth: int, minimum: int = 0) -> tuple[int, ...]:
    if depth == ref_depth:
        return tuple(layers)
    scaled = []
    for layer in layers:
        s = max(minimum, min(depth - 1, round(layer * depth / ref_depth)))
        while s in scaled and s + 1 < depth:
            s += 1
        scaled.append(s)
    return tuple(dict.fromkeys(scaled))
