"""Configuration of the two iLLaVA stages, its validation, and how presets scale to a model."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

from .policy import DEFAULT as DEFAULT_POLICY

RECYCLE_MODES = ("rank", "cluster", "prune")
PRESETS = ("image", "video", "encoder-only", "llm-only", "off")


@dataclass
class IllavaConfig:
    """What iLLaVA does to a model (docs/method.md).

    Encoder stage: at each layer in ``encoder_layers`` (0-based, inside the vision transformer) the
    ``encoder_removal`` lowest-scored units of every crop / frame are removed and recycled into
    survivors. ``encoder_removal`` is either one value for every layer or one per layer; an ``int``
    is a token count, a ``float`` in [0, 1) a fraction of the units present at that layer. Families
    that remove whole 2x2 blocks (Qwen-VL, InternVL) take counts in patch tokens, a multiple of 4.

    LLM stage: before each decoder layer in ``llm_layers`` (prefill only) every visual span keeps
    ``llm_keep_ratio`` of its tokens (one value, or one per layer), scored by the attention the
    last prompt token pays them in the previous layer.

    ``recycle`` picks how removed tokens are folded into survivors: ``rank`` (paper v1),
    ``cluster`` (ICLR version; ``cluster_neighbours`` = M, ``cluster_fraction`` = share of kept
    tokens that act as recycling tokens) or ``prune`` (no recycling). ``policy`` replaces how tokens
    are scored and folded (``illava.policy``; default: the paper's). ``feature_keep``: the share of
    every image's / video's projected tokens that enter the LLM, chosen by the policy's ``select``
    (the feature stage of peer methods such as DivPrune; None: off). ``enabled=False`` keeps the
    model patched but behaving exactly like stock transformers.

    A crop or frame too small to give a layer's ``encoder_removal`` gives what it can: the count is
    capped at what the policy can remove there (all but one unit; ToMe: half of the units present),
    and ``illava.stats`` shows the cap. ``strict=True`` raises ``ValueError`` instead (opt-in).
    """

    encoder_layers: tuple[int, ...] = ()
    encoder_removal: int | float | tuple[int | float, ...] = 0
    llm_layers: tuple[int, ...] = ()
    llm_keep_ratio: float | tuple[float, ...] = 1.0
    recycle: str = "rank"
    cluster_neighbours: int = 5
    cluster_fraction: float = 0.05
    enabled: bool = True
    policy: object | None = None  # an illava.policy.Policy; None: the paper's scoring and recycling
    feature_keep: float | None = None
    strict: bool = False
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.encoder_layers = _layer_tuple(self.encoder_layers, "encoder_layers")
        self.llm_layers = _layer_tuple(self.llm_layers, "llm_layers")
        self.encoder_removal = _per_layer_values(self.encoder_removal, _removal)
        self.llm_keep_ratio = _per_layer_values(self.llm_keep_ratio, _ratio)
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

    @property
    def features_active(self) -> bool:
        return self.enabled and self.feature_keep is not None

    @property
    def reduces(self) -> bool:
        """Whether some stage may remove tokens (a forward that cannot run inside ``torch.compile``);
        ``False``: off, or enabled with nothing to remove (stock compute)."""
        encoder = self.encoder_active and any(self.removal_at(layer) for layer in self.encoder_layers)
        llm = self.llm_active and any(self.keep_ratio_at(k) < 1 for k in self.llm_layers)
        return encoder or llm or (self.features_active and self.feature_keep < 1)

    def replace(self, **changes) -> IllavaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        encoder_depth: int,
        tokens_per_crop: int,
        llm_depth: int,
        family: str = "llava_onevision",
        llm_stage: bool = True,
        **overrides,
    ) -> IllavaConfig:
        """The preset ``name`` (``PRESETS``) of a model family (a ``config.model_type``) scaled to
        the given dimensions, without a model; ``illava.configure(model, name)`` reads them from one."""
        from .families import record_for  # the family records: data, no engine

        record = record_for(family)
        return scale_preset(
            name,
            record.table(family),
            encoder_depth=encoder_depth,
            tokens_per_crop=tokens_per_crop,
            llm_depth=llm_depth,
            llm_stage=llm_stage,
            unit=record.unit,
            **overrides,
        )

    # ----------------------------------------------------------------- validation
    def _check_self(self) -> None:
        if not isinstance(self.recycle, str) or self.recycle not in RECYCLE_MODES:
            raise ValueError(f"IllavaConfig.recycle must be one of {RECYCLE_MODES}, got {self.recycle!r}")
        for name in ("enabled", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"IllavaConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("encoder_layers", "llm_layers"):
            layers = getattr(self, name)
            if len(set(layers)) != len(layers):
                raise ValueError(f"IllavaConfig.{name} has duplicates: {layers}")
        if isinstance(self.encoder_removal, tuple) and len(self.encoder_removal) != len(self.encoder_layers):
            raise ValueError(
                f"IllavaConfig.encoder_removal has {len(self.encoder_removal)} values for "
                f"{len(self.encoder_layers)} encoder_layers; give one value or one per layer"
            )
        if isinstance(self.llm_keep_ratio, tuple) and len(self.llm_keep_ratio) != len(self.llm_layers):
            raise ValueError(
                f"IllavaConfig.llm_keep_ratio has {len(self.llm_keep_ratio)} values for "
                f"{len(self.llm_layers)} llm_layers; give one value or one per layer"
            )
        if isinstance(self.cluster_neighbours, bool) or not isinstance(self.cluster_neighbours, numbers.Integral):
            raise ValueError(
                f"IllavaConfig.cluster_neighbours must be an integer >= 1, got {self.cluster_neighbours!r}"
            )
        if self.cluster_neighbours < 1:
            raise ValueError(f"IllavaConfig.cluster_neighbours must be >= 1, got {self.cluster_neighbours}")
        if not _is_real(self.cluster_fraction) or not 0.0 < self.cluster_fraction <= 1.0:
            raise ValueError(f"IllavaConfig.cluster_fraction must be a number in (0, 1], got {self.cluster_fraction!r}")
        if self.policy is not None and not callable(getattr(self.policy, "reduce", None)):
            raise ValueError(f"IllavaConfig.policy must be an illava.policy.Policy, got {self.policy!r}")
        if self.feature_keep is not None and (not _is_real(self.feature_keep) or not 0 < self.feature_keep <= 1):
            raise ValueError(f"IllavaConfig.feature_keep must be a number in (0, 1] or None, got {self.feature_keep!r}")

    def check_against(
        self, *, encoder_depth: int, tokens_per_crop: int, llm_depth: int, feature_layer: int, unit: int = 1
    ) -> None:
        """Validate layer indices and removals against a model's dimensions; raise ``ValueError``.

        ``tokens_per_crop`` is 0 for dynamic resolution (counts are checked per frame at run time);
        ``unit`` is the number of patch tokens removed together (4 for a 2x2 block).
        """
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
        removals = self.encoder_removal if isinstance(self.encoder_removal, tuple) else (self.encoder_removal,)
        for r in removals:
            if isinstance(r, int) and r % unit:
                raise ValueError(
                    f"IllavaConfig.encoder_removal: this model removes whole blocks of {unit} patch tokens; "
                    f"a count must be a multiple of {unit}, got {r}"
                )
        n = tokens_per_crop // unit
        if self.strict and n:  # fixed crops: counts are known now (otherwise capped per crop at run time)
            policy = self.policy if self.policy is not None else DEFAULT_POLICY
            for layer in sorted(self.encoder_layers):
                r, cap = removal_units(n, self.removal_at(layer), unit), policy.max_removal(n)
                if r > cap:
                    raise ValueError(
                        f"IllavaConfig.encoder_removal: removing {r * unit} tokens at encoder layer {layer} leaves "
                        f"none or more than the {policy.name} policy can remove of the {n * unit} present (strict); "
                        f"allowed 0..{cap * unit}"
                    )
                n = policy.kept(n, r)
        if self.llm_layers and llm_depth < 2:
            raise ValueError(
                f"IllavaConfig.llm_layers: the decoder has {llm_depth} layer(s); the LLM stage needs at least 2 "
                "(layer k is scored by the attention of layer k-1)"
            )
        for layer in self.llm_layers:
            if not 1 <= layer < llm_depth:
                raise ValueError(
                    f"IllavaConfig.llm_layers: layer {layer} is out of range; allowed 1..{llm_depth - 1} "
                    "(layer k is scored by the attention of layer k-1)"
                )

    def __str__(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "preset"]
        fields = [f for f in fields if f not in ("policy=None", "feature_keep=None", "strict=False")]
        return f"IllavaConfig({', '.join(fields)})"


def removal_units(n: int, removal: int | float, unit: int = 1) -> int:
    """Units (patches, or blocks of ``unit`` patches) to remove from ``n`` units: a count is given in
    patch tokens, a fraction is of the units present."""
    if isinstance(removal, float):
        return int(n * removal + 0.5)
    return int(removal) // unit


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept of ``n`` for a keep ratio; at least one token survives."""
    if n == 0:
        return 0
    return max(1, min(n, int(n * ratio + 0.5)))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _layer_tuple(values, name: str) -> tuple[int, ...]:
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"IllavaConfig.{name} must be a sequence of layer indices (integers), got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        raise ValueError(f"IllavaConfig.{name} must hold integers, got {values!r}")
    return tuple(int(v) for v in values)


def _removal(value):
    if _is_real(value) and isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"IllavaConfig.encoder_removal count must be >= 0, got {value}")
        return int(value)
    if _is_real(value):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"IllavaConfig.encoder_removal fraction must be in [0, 1), got {value}")
        return float(value)
    raise ValueError(f"IllavaConfig.encoder_removal must be an int (count) or a float (fraction), got {value!r}")


def _ratio(value) -> float:
    if not _is_real(value):
        raise ValueError(f"IllavaConfig.llm_keep_ratio must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"IllavaConfig.llm_keep_ratio must be in (0, 1], got {value}")
    return float(value)


def _per_layer_values(value, convert):
    if isinstance(value, (list, tuple)):
        return tuple(convert(v) for v in value)
    return convert(value)


def _per_layer(value, layers: tuple[int, ...], layer: int):
    if isinstance(value, tuple):
        return value[layers.index(layer)]
    return value


# ---------------------------------------------------------------------------------- presets
def scale_preset(
    name: str,
    table: dict,
    *,
    encoder_depth: int,
    tokens_per_crop: int,
    llm_depth: int,
    llm_stage: bool = True,
    unit: int = 1,
    **overrides,
) -> IllavaConfig:
    """The preset ``name`` of a family's ``table`` scaled to a model of the given dimensions.

    ``table`` (one per adapter) holds the ``reference`` dimensions the settings were published for
    and the ``image`` / ``video`` settings. Layer indices scale with depth; integer removals scale
    with the tokens per crop, in whole units of ``unit`` tokens. ``llm_stage=False`` drops the LLM
    stage; a decoder of fewer than two layers has no LLM stage either. ``overrides`` replace fields
    of the result.
    """
    if name not in PRESETS:
        raise ValueError(
            f"unknown iLLaVA preset {name!r}; presets: {', '.join(PRESETS)} "
            "(a method name needs a model: illava.configure(model, name))"
        )
    reference = table["reference"]
    values = _preset_values(name, table)
    if "encoder_layers" in values:
        values["encoder_layers"] = _scale_layers(values["encoder_layers"], reference["encoder_depth"], encoder_depth)
        if isinstance(values["encoder_removal"], int) and reference["tokens_per_crop"]:
            scaled = values["encoder_removal"] * tokens_per_crop / reference["tokens_per_crop"]
            values["encoder_removal"] = max(1, round(scaled / unit)) * unit
    if "llm_layers" in values:
        if llm_stage and llm_depth >= 2:
            values["llm_layers"] = _scale_layers(values["llm_layers"], reference["llm_depth"], llm_depth, minimum=1)
        else:
            del values["llm_layers"], values["llm_keep_ratio"]
    values.update(overrides)
    return IllavaConfig(preset=name, **values)


def _preset_values(name: str, table: dict) -> dict:
    if name in ("image", "video"):
        return dict(table.get(name, table["image"]))
    image = table["image"]
    if name == "encoder-only":
        return {"encoder_layers": image["encoder_layers"], "encoder_removal": image["encoder_removal"]}
    if name == "llm-only":
        return {"llm_layers": image["llm_layers"], "llm_keep_ratio": image["llm_keep_ratio"]}
    return {"enabled": False}


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
