"""LLaVA-1.5 (``LlavaForConditionalGeneration``, CLIP tower) in vLLM with the encoder stage.

- The processor (``IllavaLlavaProcessingInfo.get_num_image_tokens``) reserves the reduced count:
  every image has the same patch grid (the processor resizes to the tower's size), so the count is
  ``units_after`` of the grid, plus the CLS row with the ``full`` strategy, then the feature stage.
- The CLIP layers of ``encoder_layers`` run ``illava.vllm.encoder.vit_merge_forward``; the tower's
  output holds the CLS token and the survivors in their source order; the projector maps them, and
  they fill the reduced placeholders in that order. vLLM numbers positions over the prompt as built,
  which is what the transformers backend does for LLaVA (``renumber_positions``: positions as if the
  prompt had been built with fewer placeholders), so the two backends feed the decoder the same.
"""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .config import once_per_model, resolve, spec_of
from .encoder import Stage, vit_merge_forward
from .families import llava as family
from .serving import check_serving


def _build_stage(hf_config) -> Stage | None:
    """The stage of a served LLaVA (``None``: illava is off); ``ValueError`` for what cannot run."""
    config = resolve(spec_of(hf_config), family(hf_config))
    if config is None:
        return None
    if config.encoder_layers and getattr(hf_config.vision_config, "model_type", None) != "clip_vision_model":
        raise ValueError(
            "illava.vllm: the LLaVA-1.5 encoder stage needs a CLIP vision tower; this model's is "
            f"{hf_config.vision_config.model_type!r}"
        )
    return Stage(config, unit=1, keep_first=1)  # CLIP's CLS token is never removed


def stage_of(hf_config) -> Stage | None:
    """The stage of a served LLaVA model (``None``: illava is off), resolved once per model
    (``illava.vllm.config.once_per_model``); ``ValueError`` for what cannot run."""
    return once_per_model(hf_config, _build_stage)


def reduced_count(stage: Stage, hf_config, stock: int) -> int:
    """Feature rows of an image after the stages, of ``stock`` (patches, + 1 with ``full``)."""
    head = 1 if hf_config.vision_feature_select_strategy == "full" else 0
    patches = stock - head
    side = round(patches**0.5)
    return stage.features_after(head + stage.units_after(patches, (side, side) if side * side == patches else None))


class IllavaLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        stock = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        stage = stage_of(self.get_hf_config())
        return stock if stage is None else reduced_count(stage, self.get_hf_config(), stock)


def _info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    return IllavaLlavaProcessingInfo(ctx) if isinstance(info, LlavaProcessingInfo) else info


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class IllavaLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with iLLaVA's encoder stage when the served model is configured for it
    (``illava.vllm.config``); without a configuration, stock."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.illava = stage_of(self.config)
        if self.illava is None:
            return
        check_serving(vllm_config, "LLaVA-1.5")
        layers = self.vision_tower.vision_model.encoder.layers
        for index in self.illava.config.encoder_layers:
            layer = layers[index]
            layer.forward = functools.partial(vit_merge_forward, layer, self.illava, index)
        vc = self.config.vision_config
        stock = (vc.image_size // vc.patch_size) ** 2 + (self.config.vision_feature_select_strategy == "full")
        self._illava_rows = reduced_count(self.illava, self.config, stock)

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        if self.illava is None:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        self.illava.trace = None  # a new vision call
        try:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        finally:
            self.illava.trace = None

    def _process_image_input(self, image_input):
        out = super()._process_image_input(image_input)
        if self.illava is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return out
        items = list(out)
        if self.illava.config.features_active:
            items = [x[self.illava.select(x)] for x in items]
        for x in items:
            if x.shape[0] != self._illava_rows:  # never hand vLLM a count its prompt does not hold
                raise RuntimeError(
                    f"illava.vllm: an image produced {x.shape[0]} feature rows; the processor reserved "
                    f"{self._illava_rows}"
                )
        return torch.stack(items) if isinstance(out, torch.Tensor) else items
