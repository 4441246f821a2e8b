"""Tooling of Qwen2-VL and Qwen2.5-VL: bundled and tiny configurations, the image and video
processing, stock inputs, pictures of 2x2 blocks, FLOPs dimensions."""

from __future__ import annotations

import torch

from .base import FamilyTools, FlopsDims, LayerDims, Panel, check_markers, placeholder, unnormalise


class QwenVLTools(FamilyTools):
    config_types = ("qwen2_vl", "qwen2_5_vl")
    architectures = {
        "qwen2-vl-2b": lambda: qwen2_vl_config("2b"),
        "qwen2-vl-7b": lambda: qwen2_vl_config("7b"),
        "qwen2.5-vl-3b": lambda: qwen2_5_vl_config("3b"),
        "qwen2.5-vl-7b": lambda: qwen2_5_vl_config("7b"),
    }
    tiny = {"tiny-qwen2-vl": lambda: tiny_qwen_vl_config("2"), "tiny-qwen2.5-vl": lambda: tiny_qwen_vl_config("2.5")}

    def image_processor(self, config):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        size = getattr(config, "illava_processor", {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
        return Qwen2VLImageProcessorPil(size=dict(size))

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """Qwen2-VL / Qwen2.5-VL batch: ``<image>``/``<video>`` markers become ``<|vision_start|>``
        + stock placeholders + ``<|vision_end|>``; ``mm_token_type_ids`` as the stock processor
        returns them. Placeholders are spelled as the tokenizer spells the config's ids
        (``<|image_pad|>`` / ``<|video_pad|>`` for the released tokenizers)."""
        processor = image_processor or self.image_processor(config)
        merge = config.vision_config.spatial_merge_size**2
        data, texts = {}, list(prompts)
        check_markers(prompts, images, videos)
        if images:
            pix = processor(list(images), return_tensors="pt")
            data.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
            counts = iter((pix["image_grid_thw"].prod(-1) // merge).tolist())
            token = placeholder(tokenizer, config.image_token_id, "<image>")
            texts = [expand_markers(t, "<image>", counts, token) for t in texts]
        if videos:
            packed = [video_pixels(v, processor) for v in videos]
            data["pixel_values_videos"] = torch.cat([p for p, _ in packed])
            data["video_grid_thw"] = torch.tensor([g for _, g in packed])
            counts = iter((data["video_grid_thw"].prod(-1) // merge).tolist())
            token = placeholder(tokenizer, config.video_token_id, "<video>")
            texts = [expand_markers(t, "<video>", counts, token) for t in texts]
        return tokenized(tokenizer, texts, config, data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        vc = model.config.vision_config
        ps, tps, m = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
        processor = self.image_processor(model.config)
        mean, std = mean_std or (processor.image_mean, processor.image_std)
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        grids = inputs["image_grid_thw" if kind == "image" else "video_grid_thw"]
        items, offset, unit = [], 0, 0
        for gt, gh, gw in grids.tolist():
            patches = gt * gh * gw
            x = pixels[offset : offset + patches].float().cpu().reshape(gt, gh // m, gw // m, m, m, -1, tps, ps, ps)
            # -> (gt, tps, C, gh//m, m, ps, gw//m, m, ps): the processor's patch flattening undone
            x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(gt, tps, -1, gh * ps, gw * ps)
            rows, cols = gh // m, gw // m
            grid = np.arange(rows * cols).reshape(rows, cols)
            name = "frame" if kind == "video" else "image"
            items.append(
                [
                    Panel(
                        f"{name} {f}" if gt > 1 else name,
                        unnormalise(frame[0], mean, std),
                        grid + unit + f * rows * cols,
                        m * ps,
                    )
                    for f, frame in enumerate(x)
                ]
            )
            offset += patches
            unit += gt * rows * cols
        return items

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        qwen2 = config.model_type == "qwen2_vl"
        width = vc.embed_dim if qwen2 else vc.hidden_size
        mlp = int(vc.embed_dim * vc.mlp_ratio) if qwen2 else vc.intermediate_size
        out = vc.hidden_size if qwen2 else vc.out_hidden_size
        unit = vc.spatial_merge_size**2
        return FlopsDims(
            encoder=LayerDims(width, mlp, vc.num_heads, vc.num_heads, not qwen2),
            encoder_depth=vc.depth,
            # the patch merger folds each surviving 2x2 block: an MLP on unit * width
            projector_macs_per_token=(unit * width * unit * width + unit * width * out) / unit,
            text=LayerDims.of_decoder(tc),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
            window=None if qwen2 else (vc.window_size // vc.patch_size) ** 2,
            full_layers=() if qwen2 else tuple(vc.fullatt_block_indexes),
        )


def tokenized(tokenizer, texts: list[str], config, data: dict):
    """``data`` with the token ids, attention mask and ``mm_token_type_ids`` (1: image, 2: video) of
    ``texts`` (placeholders already expanded), as the stock processor returns them."""
    from transformers import BatchFeature

    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    types = torch.zeros_like(ids)
    types[ids == config.image_token_id] = 1
    types[ids == config.video_token_id] = 2
    data.update(input_ids=ids, attention_mask=enc["attention_mask"], mm_token_type_ids=types)
    return BatchFeature(data)


def expand_markers(text: str, marker: str, counts, token: str) -> str:
    parts = text.split(marker)
    out = parts[0]
    for part in parts[1:]:
        out += "<|vision_start|>" + "\0" * next(counts) + "<|vision_end|>" + part
    return out.replace("\0", token)


def video_pixels(frames, processor) -> tuple[torch.Tensor, list[int]]:
    """``pixel_values_videos`` and ``[t, h, w]`` as the Qwen2-VL video processor makes them: frames
    resized like images, consecutive frame pairs packed into the temporal patch of 2."""
    import numpy as np
    from PIL import Image

    frames = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in frames]
    if len(frames) % 2:
        frames = frames + frames[-1:]
    out = processor(frames, return_tensors="pt")
    grid = out["image_grid_thw"][0].tolist()
    per_frame = out["pixel_values"].view(len(frames), grid[1] * grid[2], 3, 2, -1)[:, :, :, 0]  # drop the copy
    pairs = per_frame.view(len(frames) // 2, 2, *per_frame.shape[1:]).permute(0, 2, 3, 1, 4)
    return pairs.reshape(-1, 3 * 2 * per_frame.shape[-1]), [len(frames) // 2, grid[1], grid[2]]


_QWEN2_TEXT = {
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "2b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
}  # fmt: skip
_QWEN_TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def _qwen_text(size: str) -> dict:
    return {
        **_QWEN2_TEXT[size],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }


def qwen2_vl_config(size: str = "7b"):
    """Qwen2-VL ``2b`` or ``7b`` with the published dimensions (675M-parameter ViT, 32 blocks)."""
    from transformers import Qwen2VLConfig

    if size not in ("2b", "7b"):
        raise ValueError(f"unknown Qwen2-VL size {size!r}; choose 2b or 7b")
    text = _qwen_text(size)
    vision = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": text["hidden_size"],
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    return Qwen2VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=text["tie_word_embeddings"], **_QWEN_TOKENS
    )


def qwen2_5_vl_config(size: str = "7b"):
    """Qwen2.5-VL ``3b`` or ``7b`` with the published dimensions (windowed ViT, 32 blocks)."""
    from transformers import Qwen2_5_VLConfig

    if size not in ("3b", "7b"):
        raise ValueError(f"unknown Qwen2.5-VL size {size!r}; choose 3b or 7b")
    text = _qwen_text(size)
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
              "out_hidden_size": text["hidden_size"], "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2}  # fmt: skip
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=text["tie_word_embeddings"], **_QWEN_TOKENS
    )


def tiny_qwen_vl_config(version: str = "2", vocab_size: int = 256):
    """A Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) small enough for CPU tests, with a
    pixel budget of 112x168 for its image processor; token ids match
    ``illava.tools.inputs.word_tokenizer`` (image 1, video 2, vision start 6, vision end 7)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }  # fmt: skip
    tokens = {"image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 6, "vision_end_token_id": 7}
    if version == "2":
        vision = {"depth": 4, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2, "hidden_size": 64, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
        config = Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **tokens)
    else:
        vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                  "window_size": 112, "fullatt_block_indexes": [1, 3], "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "tokens_per_second": 2}  # fmt: skip
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **tokens)
    config.illava_processor = {"shortest_edge": 56 * 56, "longest_edge": 112 * 168}
    return config
