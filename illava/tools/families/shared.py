"""Tooling pieces shared by the LLaVA-style families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): the
CLIP ViT-L/14-336 and Vicuna dimensions, the tiny CLIP and Llama, the FLOPs of CLIP + an mlp2x_gelu
projector + a Llama-style decoder, and the pictures of an AnyRes image."""

from __future__ import annotations

from transformers.models.llava_onevision import modeling_llava_onevision as mlo

from ..dims import CLIP_L_336, OPENAI_CLIP, VICUNA  # noqa: F401 - re-exported to the families
from .base import FlopsDims, LayerDims, Panel

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


def clip_vicuna(config_class, size: str, **extra):
    """A LLaVA-style configuration (``config_class``) with the published dimensions of LLaVA-1.5 /
    LLaVA-1.6: CLIP ViT-L/14-336 read at layer -2 without its CLS token (576 tokens per view), an
    mlp2x_gelu projector, Vicuna v1.5 ``size`` (vocabulary 32064 as in the llava-hf releases)."""
    text = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "pad_token_id": 32001, **VICUNA[size]}  # fmt: skip
    return config_class(
        vision_config=dict(CLIP_L_336),
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **extra,
    )


def tiny_clip_llama(config_class, vocab_size: int, vision: dict, **extra):
    """A LLaVA-style configuration (``config_class``) small enough for CPU tests: ``TINY_CLIP``
    (overridden by ``vision``) read at layer -2 without its CLS token, ``TINY_LLAMA``; ``<image>`` 1."""
    return config_class(
        vision_config={**TINY_CLIP, **vision},
        text_config={**TINY_LLAMA, "vocab_size": vocab_size},
        image_token_id=1,
        image_seq_length=64,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        **extra,
    )


def clip_flops_dims(config) -> FlopsDims:
    """CLIP (or any plain ViT) read at ``vision_feature_layer`` + a 2-layer MLP projector on every
    feature row that leaves the encoder + a Llama-style decoder (LLaVA-1.5, LLaVA-NeXT)."""
    vc, tc = config.vision_config, config.text_config
    layers = config.vision_feature_layer
    width = vc.hidden_size * (1 if isinstance(layers, int) else len(layers))
    return FlopsDims(
        encoder=LayerDims.of_vit(vc),
        encoder_depth=vc.num_hidden_layers,
        projector_macs_per_token=width * tc.hidden_size + tc.hidden_size * tc.hidden_size,
        text=LayerDims.of_decoder(tc),
        text_depth=tc.num_hidden_layers,
        vocab=tc.vocab_size,
    )


def anyres_panels(config, images, image_size, unit: int) -> list[Panel]:
    """Pictures of one AnyRes image (LLaVA-OneVision, LLaVA-NeXT): the base view, and the crops in
    place on the canvas the processor tiled; ``images`` are the views as arrays, ``unit`` the index
    of the image's first unit."""
    import numpy as np

    vc = config.vision_config
    side, ps = vc.image_size // vc.patch_size, vc.patch_size
    span = side * ps
    grid = np.arange(side * side).reshape(side, side)
    panels = [Panel("base view", images[0], grid + unit, ps)]
    if len(images) > 1:
        gh, gw = mlo.get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vc.image_size)
        canvas = np.zeros((gh * span, gw * span, 3))
        units = np.zeros((gh * side, gw * side), dtype=np.int64)
        for c, im in enumerate(images[1:]):
            r, q = divmod(c, gw)
            canvas[r * span : (r + 1) * span, q * span : (q + 1) * span] = im
            units[r * side : (r + 1) * side, q * side : (q + 1) * side] = grid + unit + (c + 1) * side**2
        panels.append(Panel(f"{len(images) - 1} crops in place", canvas, units, ps))
    return panels
