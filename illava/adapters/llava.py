"""iLLaVA for ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP ViT-L/14-336 + MLP projector + Vicuna).

What is patched (``illava.remove`` undoes all of it):
- the CLIP layers listed in ``encoder_layers`` get ``illava.encoder.IllavaViTLayer`` (the encoder stage);
- the inner ``LlavaModel`` gets ``IllavaLlavaModel`` (layout of survivors, feature calls,
  placeholder bookkeeping);
- the decoder-side hooks of ``illava.llm``.

LLaVA-1.5 encodes one 336 px view per image (the processor pads the image to a square and resizes
it): a CLS token and 24x24 patches. The model reads the hidden states of the penultimate layer
(``vision_feature_layer=-2``), drops the CLS token (``vision_feature_select_strategy="default"``)
and maps every patch to one LLM token with a 2-layer MLP: 576 tokens per image. So:
- unit of removal: one patch; the CLS token (index 0) is never removed and never absorbs removed
  tokens (``keep_first = 1``);
- scoring: the attention a token receives from *all* tokens of its image, the CLS token's query
  included, averaged over heads and queries (the paper's definition; the CLS query is not singled
  out, since the features LLaVA reads are the patches, not the CLS token);
- merge layers must come no later than the layer the model reads: with ``vision_feature_layer=-2``
  on a 24-layer CLIP that is layer 22 (``dimensions().feature_layer``); a merge at the last layer
  would change nothing the model reads, and is refused by the configuration check;
- layout: the selected hidden state holds the CLS token then the survivors in their source order;
  after the projector the survivors fill the *last* rows of the image's stock feature count (the
  prompt's last placeholder stays a real token), the other rows are NaN and are dropped at the
  decoder input, whose positions are renumbered as if the prompt had been built with fewer
  placeholders (as for LLaVA-OneVision). With ``vision_feature_select_strategy="full"`` the CLS
  feature is kept and stays in the first row (577 rows per image).

The encoder stage needs a CLIP vision tower (the LLaVA-1.5 releases); other towers the ``llava``
model type allows (SigLIP, Pixtral) are refused for the encoder stage, the LLM stage works on all.

Presets (our choice, by the principle of docs/method.md, to be checked by the fidelity harness):
as for LLaVA-OneVision-7B (SigLIP, 26 layers: 92 of 729 patches removed at each of layers 5-8, about
half of the tokens) the encoder removes 72 of LLaVA-1.5-7B's 576 patches at each of CLIP-L's
layers 5-8 (24 layers; 576 -> 288), and the LLM keeps 70% of every image's tokens at layer 9 of
Vicuna-7B's 32 (LLaVA-OneVision: 8 of 28). LLaVA-1.5 takes no video: ``video`` is the ``image``
preset. Depths and removals scale to LLaVA-1.5-13B (Vicuna-13B, 40 layers: LLM layer 11) and to
other CLIP sizes.
"""

from __future__ import annotations

import torch

from ..encoder import (
    CropTrace,
    FeatureCalls,
    IllavaViTLayer,
    recording,
    stock_argument,
    stock_count_features,
    unit_trace,
)
from .base import Adapter, Dimensions, FlopsDims, LayerDims, Panel, placeholder, unnormalise
from .llava_family import require_clip, vit_dimensions

OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _side(config) -> int:
    vc = config.vision_config
    return vc.image_size // vc.patch_size


def _cls_rows(config, strategy: str | None = None) -> int:
    """Feature rows of the CLS token per image: 1 for ``full``, 0 for ``default`` (dropped)."""
    return 1 if (strategy or config.vision_feature_select_strategy) == "full" else 0


class IllavaLlavaModel(FeatureCalls):
    """LLaVA model with iLLaVA's layout of survivors.

    Modifications: the feature call (``FeatureCalls``) writes the survivors' features into the stock
    feature count (NaN rows for removed patches, module docstring). Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        state = self._illava.state
        pixel_values = stock_argument(stock, args, kwargs, "pixel_values")
        side = _side(self.config)
        if call is not None:
            images = pixel_values.shape[0]
            call.crops, call.tokens, call.item_crops = images, images * (1 + side * side), [1] * images
        out = stock(self, *args, **kwargs)
        head = _cls_rows(self.config, stock_argument(stock, args, kwargs, "vision_feature_select_strategy"))
        trace = call.work.get("crops") if call is not None else None
        if trace is not None:
            total = head + side * side
            laid = []
            for f in out.pooler_output:  # (head + survivors, D) per image, source order
                kept = f.shape[0] - head
                slots = torch.cat([torch.arange(head), torch.arange(total - kept, total)]).to(f.device)
                laid.append(stock_count_features(f, slots, total))
            out.pooler_output = laid
        if call is not None and recording(state):
            _unit_trace(call, trace, pixel_values.shape[0], side, head, pixel_values.device)
        return out


def _unit_trace(call, trace, images: int, side: int, head: int, device) -> None:
    """``illava.tools.viz``: units are the patches of every image in raster order; the feature row of
    a patch is its image's first row + the CLS row (``full``) + the slot of its survivor (the
    survivors fill the last rows, in source order)."""
    trace = trace or CropTrace.start(images, side * side, device)
    total = head + side * side
    kept = trace.positions.shape[1]
    first = (torch.arange(images) * total + total - kept)[:, None]
    assign = trace.assign.cpu()
    feature = torch.where(assign >= 0, assign + first, -1)
    call.trace = unit_trace(trace, [(side, side)] * images, feature.flatten())


class LlavaAdapter(Adapter):
    model_classes = ("LlavaForConditionalGeneration",)
    config_types = ("llava",)
    unit = 1
    keep_first = 1  # CLIP's CLS token
    renumber_positions = True
    # reference: LLaVA-1.5-7B (CLIP ViT-L/14-336, 24 layers, 576 patches; Vicuna-7B, 32 layers).
    # No "video" entry: LLaVA-1.5 takes no video, the "video" preset is the "image" one.
    presets = {
        "llava": {
            "reference": {"encoder_depth": 24, "tokens_per_crop": 576, "llm_depth": 32},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 72, "llm_layers": (9,), "llm_keep_ratio": 0.7},
        }
    }

    def dimensions(self, model) -> Dimensions:
        return vit_dimensions(model)

    def check(self, model, config) -> None:
        require_clip(model, config, "LLaVA")

    def patch(self, model, record) -> None:
        record.swap(model.model, IllavaLlavaModel)
        layers = model.model.vision_tower.encoder.layers
        for i in record.state.config.encoder_layers:
            record.swap(layers[i], IllavaViTLayer, layer=i)

    # ------------------------------------------------------------------------------ tools
    architectures = {
        "llava-1.5-7b": lambda: llava_config("7b"),
        "llava-1.5-13b": lambda: llava_config("13b"),
    }
    tiny = {"tiny-llava": lambda: tiny_llava_config()}

    def image_processor(self, config):
        """LLaVA-1.5's preprocessing: pad to a square with the mean colour, resize to the tower's size."""
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        size = config.vision_config.image_size
        mean, std = OPENAI_CLIP
        return LlavaImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_pad=True,
            image_mean=mean,
            image_std=std,
        )

    def tokens_per_image(self, config) -> int:
        return _side(config) ** 2 + _cls_rows(config)

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """LLaVA batch: every ``<image>`` marker becomes the stock number of placeholders (576 for
        LLaVA-1.5, +1 with the ``full`` strategy); images are ordered as their markers."""
        from transformers import BatchFeature

        if videos or any("<video>" in p for p in prompts):
            raise ValueError("LLaVA-1.5 (LlavaForConditionalGeneration) takes no video")
        if sum(p.count("<image>") for p in prompts) != len(images):
            raise ValueError("the number of <image> markers must match the images given")
        token = placeholder(tokenizer, config.image_token_id, "<image>")
        count = self.tokens_per_image(config)
        texts = [p.replace("<image>", token * count) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if images:
            processor = image_processor or self.image_processor(config)
            data["pixel_values"] = processor(list(images), return_tensors="pt")["pixel_values"]
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        side, ps = _side(model.config), model.config.vision_config.patch_size
        mean, std = mean_std or OPENAI_CLIP
        grid = np.arange(side * side).reshape(side, side)
        pixels = inputs["pixel_values"]
        return [
            [Panel("image", unnormalise(pixels[n], mean, std), grid + n * side * side, ps)]
            for n in range(len(call.item_crops))
        ]

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        layers = config.vision_feature_layer
        width = vc.hidden_size * (1 if isinstance(layers, int) else len(layers))
        return FlopsDims(
            encoder=LayerDims(
                vc.hidden_size, vc.intermediate_size, vc.num_attention_heads, vc.num_attention_heads, False
            ),
            encoder_depth=vc.num_hidden_layers,
            # 2-layer MLP (mlp2x_gelu) on every feature row that leaves the encoder
            projector_macs_per_token=width * tc.hidden_size + tc.hidden_size * tc.hidden_size,
            text=LayerDims.of_decoder(tc),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
        )


# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), the LLaVA-1.5 vision tower
_CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# Vicuna-7B / -13B v1.5 (Llama-2), vocabulary 32064 as in the llava-hf releases
_VICUNA = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40},
}  # fmt: skip


def llava_config(size: str = "7b"):
    """LLaVA-1.5 ``7b`` or ``13b`` with the published dimensions: CLIP ViT-L/14-336 read at layer -2
    without its CLS token (576 tokens per image), an mlp2x_gelu projector, Vicuna v1.5."""
    from transformers import LlavaConfig

    if size not in _VICUNA:
        raise ValueError(f"unknown LLaVA-1.5 size {size!r}; choose one of {sorted(_VICUNA)}")
    text = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "pad_token_id": 32001, **_VICUNA[size]}  # fmt: skip
    return LlavaConfig(
        vision_config=dict(_CLIP_L_336),
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


# the CLIP and Llama of the tiny LLaVA-1.5 / LLaVA-NeXT test configurations
TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "projection_dim": 32,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def tiny_llava_config(vocab_size: int = 256, **vision):
    """A LLaVA-1.5 small enough for CPU tests: 64 px images of 8x8 patches (64 tokens each, CLS
    dropped), a 6-layer CLIP read at layer -2 (merges allowed at layers 0-4) and a 4-layer Llama with
    grouped-query attention. Token ids match ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1)."""
    from transformers import LlavaConfig

    vision_config = {**TINY_CLIP, **vision}
    text_config = {**TINY_LLAMA, "vocab_size": vocab_size}
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=1,
        image_seq_length=64,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
