"""Tooling of Qwen3-VL and Qwen3-VL-MoE: bundled and tiny configurations, the image processor,
stock inputs (a vision span per temporal patch of a video), FLOPs dimensions; pictures as Qwen2-VL's."""

from __future__ import annotations

import torch

from .base import FlopsDims, LayerDims, check_markers, placeholder
from .qwen_vl import QwenVLTools, expand_markers, tokenized, video_pixels


class Qwen3VLTools(QwenVLTools):
    config_types = ("qwen3_vl", "qwen3_vl_moe")
    architectures = {"qwen3-vl-8b": lambda: qwen3_vl_config("8b")}
    tiny = {"tiny-qwen3-vl": lambda: tiny_qwen3_vl_config()}

    def image_processor(self, config):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vc = config.vision_config
        size = getattr(config, "illava_processor", {"shortest_edge": 65536, "longest_edge": 16777216})
        return Qwen2VLImageProcessorPil(
            size=dict(size),
            patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """Qwen3-VL batch: ``<image>`` markers as for Qwen2-VL; a ``<video>`` marker becomes one
        ``<|vision_start|>`` + placeholders + ``<|vision_end|>`` per temporal patch (stock positions
        every temporal patch as a separate grid); ``mm_token_type_ids`` as the stock processor
        returns them."""
        if not videos:
            return super().build_inputs(config, tokenizer, prompts, images, (), image_processor)
        check_markers(prompts, images, videos)
        processor = image_processor or self.image_processor(config)
        merge = config.vision_config.spatial_merge_size**2
        packed = [video_pixels(v, processor) for v in videos]
        # one marker per temporal patch, then expanded like images
        frames = iter(t for _, (t, _, _) in packed)
        texts = []
        for prompt in prompts:
            parts = prompt.split("<video>")
            texts.append(parts[0] + "".join("<video>" * next(frames) + part for part in parts[1:]))
        counts = iter([h * w // merge for _, (t, h, w) in packed for _ in range(t)])
        token = placeholder(tokenizer, config.video_token_id, "<video>")
        texts = [expand_markers(t, "<video>", counts, token) for t in texts]
        data = {}
        if images:
            pix = processor(list(images), return_tensors="pt")
            data.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
            counts = iter((pix["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [
                expand_markers(t, "<image>", counts, placeholder(tokenizer, config.image_token_id, "<image>"))
                for t in texts
            ]
        data["pixel_values_videos"] = torch.cat([p for p, _ in packed])
        data["video_grid_thw"] = torch.tensor([g for _, g in packed])
        return tokenized(tokenizer, texts, config, data)

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        width, unit = vc.hidden_size, vc.spatial_merge_size**2
        merger = unit * width * unit * width + unit * width * vc.out_hidden_size
        mergers = 1 + len(vc.deepstack_visual_indexes)
        mlp = tc.intermediate_size
        if config.model_type == "qwen3_vl_moe":  # active experts per token
            mlp = tc.moe_intermediate_size * tc.num_experts_per_tok
        return FlopsDims(
            encoder=LayerDims(width, vc.intermediate_size, vc.num_heads, vc.num_heads, False),
            encoder_depth=vc.depth,
            # the merger and the deepstack mergers fold each surviving 2x2 block
            projector_macs_per_token=mergers * merger / unit,
            text=LayerDims(tc.hidden_size, mlp, tc.num_attention_heads, tc.num_key_value_heads, True),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
        )


_QWEN3_TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def qwen3_vl_config(size: str = "8b"):
    """Qwen3-VL-8B-Instruct with the published dimensions (27-block ViT with deepstack blocks
    8, 16, 24; 36-layer decoder)."""
    from transformers import Qwen3VLConfig

    if size != "8b":
        raise ValueError(f"unknown Qwen3-VL size {size!r}; choose 8b")
    text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}  # fmt: skip
    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
              "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh"}  # fmt: skip
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **_QWEN3_TOKENS)


def tiny_qwen3_vl_config(moe: bool = False, vocab_size: int = 256):
    """A Qwen3-VL (``moe=True``: Qwen3-VL-MoE) small enough for CPU tests, with deepstack blocks 0
    and 2 of 4 (one before, one between the shared tests' merge layers 1 and 3) and a pixel budget of
    128x192 for its image processor; token ids match ``illava.tools.inputs.word_tokenizer``."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    text = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab_size, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                            "mrope_interleaved": True},
    }  # fmt: skip
    if moe:
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0, 2]}  # fmt: skip
    tokens = {"image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 6, "vision_end_token_id": 7}
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    config = cls(vision_config=vision, text_config=text, tie_word_embeddings=True, **tokens)
    config.illava_processor = {"shortest_edge": 64 * 64, "longest_edge": 128 * 192}
    return config
