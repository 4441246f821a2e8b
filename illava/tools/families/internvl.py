"""Tooling of InternVL (``InternVLForConditionalGeneration``): bundled and tiny configurations,
the tiling image processor, stock inputs, pictures of tiles, FLOPs dimensions."""

from __future__ import annotations

import dataclasses

import torch

from ...adapters.internvl import patch_side
from .base import FamilyTools, FlopsDims, LayerDims, Panel, check_markers, placeholder, unnormalise

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class InternVLTools(FamilyTools):
    config_types = ("internvl",)
    architectures = {
        "internvl2.5-8b": lambda: internvl_config("8b"),
        "internvl2.5-26b": lambda: internvl_config("26b"),
    }
    tiny = {"tiny-internvl": lambda: tiny_internvl_config()}

    def image_processor(self, config):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        size = config.vision_config.image_size[0]
        options = {
            "crop_to_patches": True,
            "min_patches": 1,
            "max_patches": 12,
            **getattr(config, "illava_processor", {}),
        }
        mean, std = IMAGENET
        return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std, **options)

    def tokens_per_tile(self, config) -> int:
        return int(patch_side(config) ** 2 * config.downsample_ratio**2)

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """InternVL batch: an ``<image>`` marker becomes ``<img>`` + placeholders for every tile +
        ``</img>``; a ``<video>`` marker one ``Frame{i}: <img>...</img>`` per frame (a tile each),
        as the stock processor writes them. Tiles are ordered as their markers."""
        from transformers import BatchFeature

        processor = image_processor or self.image_processor(config)
        check_markers(prompts, images, videos)
        token = placeholder(tokenizer, config.image_token_id, "<image>")
        per_tile = self.tokens_per_tile(config)
        images, videos = iter(images), iter(videos)
        texts, tiles = [], []
        for prompt in prompts:
            pieces, out = prompt.replace("<video>", "\0v\0").replace("<image>", "\0i\0").split("\0"), ""
            for piece in pieces:
                if piece == "i":
                    pix = processor([next(images)], return_tensors="pt")
                    tiles.append(pix["pixel_values"])
                    out += "<img>" + "\1" * (per_tile * int(pix["num_patches"][0])) + "</img>"
                elif piece == "v":
                    frames = next(videos)
                    tiles.append(processor(list(frames), crop_to_patches=False, return_tensors="pt")["pixel_values"])
                    out += "".join(f"Frame{i + 1}: <img>" + "\1" * per_tile + "</img>\n" for i in range(len(frames)))
                else:
                    out += piece
            texts.append(out.replace("\1", token))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if tiles:
            data["pixel_values"] = torch.cat(tiles)
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        config = model.config
        side, ps = patch_side(config), config.vision_config.patch_size[0]
        mean, std = mean_std or IMAGENET
        blocks = (side // 2) ** 2
        ids = inputs["input_ids"]
        where = (ids == config.image_token_id).nonzero()
        new = torch.ones(where.shape[0], dtype=torch.bool)
        new[1:] = (where[1:, 0] != where[:-1, 0]) | (where[1:, 1] != where[:-1, 1] + 1)
        starts = new.nonzero().flatten().tolist() + [where.shape[0]]
        per_tile = self.tokens_per_tile(config)
        grid = np.arange(blocks).reshape(side // 2, side // 2)
        items, tile = [], 0
        for a, b in zip(starts[:-1], starts[1:]):
            count = (b - a) // per_tile
            panels = [
                Panel(
                    f"tile {t}",
                    unnormalise(inputs["pixel_values"][tile + t], mean, std),
                    grid + (tile + t) * blocks,
                    2 * ps,
                )
                for t in range(count)
            ]
            if count > 1:  # the processor puts the thumbnail (the whole image) last: draw it first
                panels = [dataclasses.replace(panels[-1], name="thumbnail"), *panels[:-1]]
            items.append(panels)
            tile += count
        return items

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        folded = int(vc.hidden_size / config.downsample_ratio**2)
        return FlopsDims(
            encoder=LayerDims.of_vit(vc),
            encoder_depth=vc.num_hidden_layers,
            # pixel shuffle + projector (LayerNorm, 4d -> text width -> text width) per LLM token, i.e.
            # per 4 encoder tokens; it runs on every block, removed ones included
            projector_macs_per_token=(folded * tc.hidden_size + tc.hidden_size * tc.hidden_size)
            * config.downsample_ratio**2,
            text=LayerDims.of_decoder(tc),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
            projector_on_stock=True,
        )


# InternViT-300M-448px (InternVL2.5 1B-8B, InternVL3 1B-14B) and InternViT-6B-448px-V2.5 (26B-78B)
_INTERNVIT = {
    "300m": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "norm_type": "layer_norm", "use_qk_norm": False},
    "6b": {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "num_attention_heads": 25,
           "norm_type": "rms_norm", "use_qk_norm": True},
}  # fmt: skip
# InternLM2.5-7B / -20B, Llama-style (gated MLP, grouped-query attention): modelled as ``llama``,
# which has the same compute at the same dimensions
_INTERNLM2_5 = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 92553},
    "26b": {"hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 48, "num_attention_heads": 48,
            "num_key_value_heads": 8, "vocab_size": 92553},
}  # fmt: skip


def internvl_config(size: str = "8b"):
    """InternVL2.5 ``8b`` (InternViT-300M + InternLM2.5-7B) or ``26b`` (InternViT-6B + InternLM2.5-20B)
    with the published dimensions, 448 px tiles, pixel shuffle 0.5 (256 LLM tokens per tile)."""
    from transformers import InternVLConfig

    if size not in _INTERNLM2_5:
        raise ValueError(f"unknown InternVL2.5 size {size!r}; choose one of {sorted(_INTERNLM2_5)}")
    vision = {"image_size": 448, "patch_size": 14, "layer_scale_init_value": 0.1, "use_mean_pooling": True,
              **_INTERNVIT["300m" if size == "8b" else "6b"]}  # fmt: skip
    text = {"model_type": "llama", "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, **_INTERNLM2_5[size]}  # fmt: skip
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=92546, image_seq_length=256, tie_word_embeddings=False
    )


def tiny_internvl_config(vocab_size: int = 256):
    """An InternVL small enough for CPU tests: 64 px tiles of 8x8 patches (16 blocks, 16 LLM tokens
    per tile, at most 4 tiles + thumbnail), a 4-layer InternViT with q/k norms and a 4-layer Qwen2.
    Token ids match ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1)."""
    from transformers import InternVLConfig

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "image_size": 64, "patch_size": 8, "use_qk_norm": True, "norm_type": "rms_norm",
              "layer_scale_init_value": 1.0}  # fmt: skip
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab_size,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": True}  # fmt: skip
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=1, image_seq_length=16)
    config.illava_processor = {"max_patches": 4}
    return config
