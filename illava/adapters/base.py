"""The adapter interface: everything illava knows about one model family, in one place.

What a family *is* lives in its record (``illava.families``: the classes and model types it
matches, its unit, the leading tokens never removed, how positions follow the survivors, the
layers that can merge, its preset table and its dimensions), read by every engine. An adapter is
``record`` (``Adapter.__init_subclass__`` copies ``model_classes``, ``config_types``, ``unit``,
``keep_first``, ``renumber_positions`` and ``presets`` from it; ``dimensions``,
``mergeable_layers``, ``llm_stage_in_presets``, ``adjust_preset`` and ``preset`` ask it) plus what
only the transformers backend needs. Adding a family: CONTRIBUTING.md. Nothing outside the adapters
asks which family a model is; the runtime (``illava.hf.encoder``, ``illava.hf.llm``, ``illava.api``)
only calls what is declared here.

An adapter says:

1. **its record** (``record``: ``illava.families``), and so which classes it serves;
2. **its parts** (``parts``: the inner multimodal model, the vision tower, the decoder; and
   ``scoring_attention``: the attention module of a decoder layer);
3. **its dimensions and presets**, the record's (``dimensions``, ``preset``);
4. **its unit of removal**, the record's (``unit``, ``keep_first``), and how the encoder
   stage runs (``patch``: the merge layers and the layout of survivors, producing features at the
   stock count with NaN rows for removed tokens, ``illava.hf.encoder.stock_count_features``);
5. **what the LLM stage reads of it** (``decoder_family``: ``illava.hf.llm.DecoderFamily``, handed to
   the stage's hooks when they are registered): how survivors are positioned (``renumber_positions``,
   the record's), and, only where the family differs from the runtime's defaults, methods of these
   names: how the features split into images / videos (``item_lengths``), the scoring query/key of
   its decoder attention (``query_key``; default: Llama-style RoPE), extra decoder inputs gathered
   with the kept tokens (``gather_decoder_inputs``, Qwen3-VL's deepstack features; default: none),
   and the decoder's padding mask and bidirectional blocks when the model prepares the masks itself
   (``decoder_masks``, Gemma 3);

What only the tools need (bundled and tiny configurations, image processors, stock inputs without
the combined processor, pictures of units, FLOPs dimensions) is not here: it is the family's
``illava.tools.families`` module (``illava.tools.families.base.FamilyTools``). The runtime
imports no tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import IllavaConfig
from ..families import Dimensions, Record
from ..presets import preset


@dataclass
class Parts:
    inner: torch.nn.Module  # the multimodal model (``model.model``)
    vision: torch.nn.Module  # the vision tower
    decoder: torch.nn.Module  # the language model (decoder stack with ``.layers``)


class Adapter:
    """Base of every family adapter; the defaults fit Llama-style decoders."""

    record: Record | None = None  # the family (illava.families); the next six come from it
    model_classes: tuple[str, ...] = ()
    config_types: tuple[str, ...] = ()
    unit = 1
    keep_first = 0  # encoder tokens of a crop before its units, never removed (a CLS token: 1)
    renumber_positions = True
    presets: dict[str, dict] = {}  # config type -> {"reference": dims, "image": settings, "video": settings}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        record = cls.__dict__.get("record")
        if record is not None:
            cls.model_classes, cls.config_types = record.model_classes, record.model_types
            cls.unit, cls.keep_first, cls.renumber_positions = record.unit, record.keep_first, record.renumber_positions
            cls.presets = record.presets

    # ------------------------------------------------------------------ parts and dimensions
    def for_model(self, model) -> Adapter:
        """The adapter of ``model`` itself (``illava.adapters.adapter_for`` asks): this one, or a
        copy whose data fit the model where a family's models differ (LLaVA's vision towers: the
        layer mixin and ``keep_first``)."""
        return self

    def parts(self, model) -> Parts:
        inner = model.model
        return Parts(inner, inner.vision_tower, inner.language_model)

    def dimensions(self, model) -> Dimensions:
        return self.record.dimensions(model.config)

    def scoring_attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    def mergeable_layers(self, model) -> tuple[int, ...]:
        """The encoder layers where the encoder stage may merge (up to the feature layer)."""
        return self.record.mergeable_layers(model.config)

    # ------------------------------------------------------------------ presets and checks
    def llm_stage_in_presets(self, model) -> bool:
        return self.record.llm_stage_in_presets(model.config)

    def preset(self, model, name: str) -> IllavaConfig:
        """The preset ``name`` scaled to ``model`` (``illava.presets.preset`` on its configuration)."""
        return preset(model.config, name, self.record)

    def adjust_preset(self, model, config: IllavaConfig) -> IllavaConfig:
        return self.record.adjust_preset(model.config, config)

    def check(self, model, config: IllavaConfig) -> None:
        """Raise ``ValueError`` for a configuration this family cannot run."""

    # ------------------------------------------------------------------ the stages
    model_mixin: type | None = None  # mixin of the inner model (``illava.hf.encoder.FeatureCalls`` and the layout)
    layer_mixin: type | None = None  # mixin of the encoder's merge layers (``illava.hf.encoder.IllavaViTLayer``)

    def encoder_layers(self, model) -> torch.nn.ModuleList:
        """The vision encoder's layers (the merge layers are among them)."""
        return self.parts(model).vision.encoder.layers

    def patch(self, model, record) -> None:
        """Install the encoder stage and the layout of survivors (class swaps and hooks on ``record``):
        ``model_mixin`` on the inner model, ``layer_mixin`` on every merge layer (with the mixin's
        ``_illava_pre_hook``, if any: ``illava.hf.encoder.PassMergeInputs``), then ``patch_more``."""
        record.swap(self.parts(model).inner, self.model_mixin)
        merge_layers = record.state.config.encoder_layers
        if merge_layers:  # without an encoder stage, any vision tower will do (LLaVA with DINOv2, ...)
            layers = self.encoder_layers(model)
            hook = getattr(self.layer_mixin, "_illava_pre_hook", None)
            for i in merge_layers:
                record.swap(layers[i], self.layer_mixin, layer=i)
                if hook is not None:
                    record.hook(layers[i], hook(record.state), "pre")
        self.patch_more(model, record)

    def patch_more(self, model, record) -> None:
        """Hooks and swaps of the family beyond ``patch``'s (default: none)."""

    def decoder_family(self):
        """What the LLM stage reads of the family (``illava.hf.llm.DecoderFamily``), handed to its hooks
        when they are registered: ``scoring_attention`` and ``renumber_positions``, and of
        ``query_key``, ``item_lengths``, ``decoder_masks``, ``gather_decoder_inputs`` the ones this
        adapter defines (the runtime's defaults otherwise: Llama-style RoPE scoring, features split
        by their output, the decoder's own 2D mask, no extra decoder inputs)."""
        from ..hf.llm import DecoderFamily

        given = {
            name: getattr(self, name)
            for name in ("query_key", "item_lengths", "decoder_masks", "gather_decoder_inputs")
            if callable(getattr(self, name, None))
        }
        return DecoderFamily(self.scoring_attention, self.renumber_positions, **given)


def require_strategy(model, config: IllavaConfig, wanted: str, stage: str, why: str) -> None:
    """``ValueError`` when the encoder stage is on and the model's ``vision_feature_select_strategy``
    is not ``wanted``; ``stage`` names the encoder stage, ``why`` says what ``wanted`` means."""
    strategy = model.config.vision_feature_select_strategy
    if config.encoder_layers and strategy != wanted:
        raise ValueError(
            f"illava: {stage} needs vision_feature_select_strategy={wanted!r} ({why}); this model uses {strategy!r}"
        )
