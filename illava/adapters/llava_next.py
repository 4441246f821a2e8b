"""iLLaVA for ``LlavaNextForConditionalGeneration`` (LLaVA-1.6: CLIP ViT-L/14-336 + MLP projector +
Vicuna / Mistral / Nous-Hermes, AnyRes images).

What is patched (``illava.remove`` undoes all of it):
- the CLIP layers listed in ``encoder_layers`` get ``illava.encoder.IllavaViTLayer`` (the encoder stage,
  shared with LLaVA-1.5: the CLS token is never removed, scores come from all tokens);
- the inner ``LlavaNextModel`` gets ``IllavaLlavaNextModel`` (layout of survivors, feature calls,
  placeholder bookkeeping);
- the decoder-side hooks of ``illava.llm``.

LLaVA-1.6 encodes every image as a 336 px base view plus 336 px crops on a grid chosen from
``image_grid_pinpoints`` (AnyRes). Every view is a CLS token and 24x24 patches; the model reads
the penultimate layer (``vision_feature_layer=-2``) without the CLS token (strategy ``default``),
then ``pack_image_features`` lays the crops out as one patch grid, cuts the padding rows / columns
the processor added (``unpad_image``) and appends an ``image_newline`` token after every row of the
unpadded grid; the base view comes first, without newlines. So:
- unit of removal: one patch per view (the same removal in the base view and in every crop); the
  CLS token (index 0) is never removed (``keep_first = 1``);
- merge layers must come no later than the layer the model reads (``dimensions().feature_layer``:
  22 for CLIP-L with ``-2``);
- layout (``AnyResLayout``, shared with LLaVA-OneVision): base-view survivors in raster order;
  crop survivors placed at their own patch on the full crop grid, those in the padding stock
  unpadding cuts off dropped, a newline after every row of the unpadded grid (rows left empty
  included). LLaVA-NeXT has no ``anyres_max_N`` budget: survivors never exceed the stock count, so
  nothing is ever pooled. Features keep the stock count: the survivors fill the image's last rows,
  the other rows are NaN and are dropped at the decoder input, whose positions are renumbered as if
  the prompt had been built with fewer placeholders.

The encoder stage needs a CLIP vision tower read with ``vision_feature_select_strategy='default'``
(the LLaVA-1.6 releases): with ``full`` stock ``pack_image_features`` cannot lay CLIP's 577 tokens
per crop out as a grid. The LLM stage works on all.

Presets (our choice, by the same principle as LLaVA-1.5-7B, to be checked by the fidelity harness):
72 of 576 patches removed in every view (base and crops) at each of CLIP-L's layers 5-8
(576 -> 288 per view), the LLM keeps 70% of every image's tokens at layer 9 of Vicuna-7B's 32.
LLaVA-NeXT (this class) takes no video: ``video`` is the ``image`` preset.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next import modeling_llava_next as mln

from ..encoder import FeatureCalls, IllavaViTLayer
from .base import Adapter, Dimensions, FlopsDims, Panel, placeholder, unnormalise
from .llava import _CLIP_L_336, _VICUNA, OPENAI_CLIP, TINY_CLIP, TINY_LLAMA, LlavaAdapter
from .llava_family import AnyResLayout, require_clip, vit_dimensions
from .llava_onevision import anyres_panels


class IllavaLlavaNextModel(AnyResLayout, FeatureCalls):
    """LLaVA-NeXT model with iLLaVA's layout of survivors.

    Modifications: the feature call (``FeatureCalls``); ``pack_image_features`` lays the survivors
    out by their source positions (module docstring) at the stock feature count. Disabled: stock.
    """

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        def stock(features, newline):
            return super(IllavaLlavaNextModel, self).pack_image_features(
                features, image_sizes, vision_feature_select_strategy, newline
            )

        return self._pack_anyres(stock, image_features, image_sizes, image_newline, None)


class LlavaNextAdapter(Adapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    config_types = ("llava_next",)
    unit = 1
    keep_first = 1  # CLIP's CLS token, in the encoder only (dropped by the "default" strategy)
    renumber_positions = True
    counts_depend_on_weights = True  # survivors cut away by unpadding follow where they lie
    # reference: LLaVA-1.6-Vicuna-7B (CLIP ViT-L/14-336, 24 layers, 576 patches per view;
    # Vicuna-7B, 32 layers). No "video" entry: this class takes no video, "video" is "image".
    presets = {
        "llava_next": {
            "reference": {"encoder_depth": 24, "tokens_per_crop": 576, "llm_depth": 32},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 72, "llm_layers": (9,), "llm_keep_ratio": 0.7},
        }
    }

    def dimensions(self, model) -> Dimensions:
        return vit_dimensions(model)

    def check(self, model, config) -> None:
        require_clip(model, config, "LLaVA")  # the same CLIP encoder stage as LLaVA-1.5
        if config.encoder_layers and model.config.vision_feature_select_strategy != "default":
            raise ValueError(
                "illava: the LLaVA-NeXT encoder stage needs vision_feature_select_strategy='default' (the CLS token "
                f"dropped); this model uses {model.config.vision_feature_select_strategy!r}"
            )

    def patch(self, model, record) -> None:
        record.swap(model.model, IllavaLlavaNextModel)
        layers = model.model.vision_tower.encoder.layers
        for i in record.state.config.encoder_layers:
            record.swap(layers[i], IllavaViTLayer, layer=i)

    # ------------------------------------------------------------------------------ tools
    architectures = {"llava-v1.6-vicuna-7b": lambda: llava_next_config("vicuna-7b")}
    tiny = {"tiny-llava-next": lambda: tiny_llava_next_config()}

    def image_processor(self, config):
        """LLaVA-1.6's preprocessing (PIL backend): the base view resized to the tower's square, the
        image resized and padded to the best grid of ``image_grid_pinpoints`` and cut into crops."""
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        size = config.vision_config.image_size
        mean, std = OPENAI_CLIP
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            image_mean=mean,
            image_std=std,
        )

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """LLaVA-NeXT batch: every ``<image>`` marker becomes the stock number of placeholders for
        its image's size (``image_token_count``); images are ordered as their markers."""
        from transformers import BatchFeature

        if videos or any("<video>" in p for p in prompts):
            raise ValueError("LLaVA-NeXT (LlavaNextForConditionalGeneration) takes no video")
        if sum(p.count("<image>") for p in prompts) != len(images):
            raise ValueError("the number of <image> markers must match the images given")
        texts, data = list(prompts), {}
        if images:
            processor = image_processor or self.image_processor(config)
            pix = processor(list(images), return_tensors="pt")
            data["pixel_values"], data["image_sizes"] = pix["pixel_values"], pix["image_sizes"]
            sizes = iter(pix["image_sizes"].tolist())
            token = placeholder(tokenizer, config.image_token_id, "<image>")
            texts = []
            for prompt in prompts:
                while "<image>" in prompt:
                    prompt = prompt.replace("<image>", "\0" * image_token_count(config, next(sizes)), 1)
                texts.append(prompt.replace("\0", token))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        span = side * vc.patch_size
        mean, std = mean_std or OPENAI_CLIP
        pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
        items, unit = [], 0
        for n, count in enumerate(call.item_crops):
            images = [unnormalise(v, mean, std)[:span, :span] for v in pixels[n][:count]]
            items.append(anyres_panels(model.config, images, sizes[n].tolist(), unit))
            unit += count * side**2
        return items

    def flops_dims(self, config) -> FlopsDims:
        # the same CLIP + mlp2x_gelu projector + Llama-style decoder as LLaVA-1.5
        return LlavaAdapter.flops_dims(self, config)


def image_token_count(config, image_size) -> int:
    """Placeholders stock transformers uses for one image of ``(height, width)`` pixels, computed by
    the stock ``pack_image_features`` on one-channel zeros (follows the installed transformers)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    crops = mln.image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vc.image_size)
    stub = type("Stub", (), {"config": config})()
    _, lens = mln.LlavaNextModel.pack_image_features(
        stub,
        [torch.zeros(crops, side * side, 1)],
        torch.tensor([list(image_size)]),
        config.vision_feature_select_strategy,
        torch.zeros(1),
    )
    return int(lens[0])


# LLaVA-1.6's grid: 2x1, 1x2, 2x2, 3x1 and 1x3 crops of 336 px
_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next_config(name: str = "vicuna-7b"):
    """LLaVA-1.6 with the published dimensions: CLIP ViT-L/14-336 read at layer -2 without its CLS
    token (576 tokens per view), an mlp2x_gelu projector, AnyRes over ``_PINPOINTS_336``, Vicuna
    v1.5 (llava-hf/llava-v1.6-vicuna-7b-hf: vocabulary 32064, ``<image>`` 32000)."""
    from transformers import LlavaNextConfig

    sizes = {"vicuna-7b": "7b"}
    if name not in sizes:
        raise ValueError(f"unknown LLaVA-1.6 model {name!r}; choose one of {sorted(sizes)}")
    text = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "pad_token_id": 32001,
            **_VICUNA[sizes[name]]}  # fmt: skip
    return LlavaNextConfig(
        vision_config=dict(_CLIP_L_336),
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[list(p) for p in _PINPOINTS_336],
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def tiny_llava_next_config(vocab_size: int = 256, **vision):
    """A LLaVA-1.6 small enough for CPU tests: 64 px views of 8x8 patches (64 tokens each, CLS
    dropped) on LLaVA-1.6's grid shapes (2x1, 1x2, 2x2, 3x1, 1x3 crops), a 6-layer CLIP read at
    layer -2 (merges allowed at layers 0-4) and a 4-layer Llama with grouped-query attention.
    Token ids match ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1)."""
    from transformers import LlavaNextConfig

    vision_config = {**TINY_CLIP, **vision}
    text_config = {**TINY_LLAMA, "vocab_size": vocab_size}
    return LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=1,
        image_seq_length=64,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[h * 64 // 336, w * 64 // 336] for h, w in _PINPOINTS_336],
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
