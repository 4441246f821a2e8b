"""iLLaVA for ``LlavaOnevisionForConditionalGeneration`` (SigLIP encoder + Qwen2 decoder).

What is patched (``illava.remove`` undoes all of it):
- the SigLIP layers listed in ``encoder_layers`` get ``illava.encoder.IllavaViTLayer`` (the encoder stage);
- the inner ``LlavaOnevisionModel`` gets ``IllavaLlavaOnevisionModel`` (layout of survivors,
  feature calls, placeholder bookkeeping);
- the decoder-side hooks of ``illava.llm``.

Unit of removal: a patch. Layout of survivors (the authors reshaped survivors into a fake square
grid; we place every survivor at the patch it came from, its own position):
- base view and single-crop images: survivors in raster order (+ the newline token as stock);
- AnyRes crops: survivors are placed on the full crop grid, those in the padding that stock
  ``unpad_image`` cuts away are dropped, and a newline follows every row of the unpadded grid.
  If the survivors still exceed the stock budget (the ``anyres_max_N`` rule), or would need more
  tokens than stock, they are averaged into the cells of the grid stock would downsample to;
- video frames: stock pools 27x27 -> 14x14 (``ceil(side / 2)``). With K survivors per frame we
  pool into ``ceil(sqrt(K) / 2)`` squared cells over the frame, averaging the survivors in each
  cell, so pooling shrinks the token count by the same factor as stock (361 -> 100 per frame for
  the authors' 92-token removals at four layers). Empty cells give no token.
Features keep the stock count: survivors fill the last slots of each image (each frame's first
slots for videos), the other rows are NaN and are dropped at the decoder input, whose positions are
renumbered as if the prompt had been built with fewer placeholders (the authors' setting).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as mlo

from ..encoder import (
    CropTrace,
    FeatureCalls,
    IllavaViTLayer,
    current_call,
    pool_survivors,
    recording,
    stock_argument,
    unit_trace,
)
from .base import Adapter, Dimensions, FlopsDims, LayerDims, Panel, placeholder, unnormalise
from .llava_family import AnyResLayout, vit_dimensions


class IllavaLlavaOnevisionModel(AnyResLayout, FeatureCalls):
    """LLaVA-OneVision model with iLLaVA's layout of survivors.

    Modifications: the feature calls (``FeatureCalls``); ``pack_image_features`` and
    ``apply_pooling`` lay the survivors out by their source positions (module docstring) at the
    stock feature count. Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        out = stock(self, *args, **kwargs)
        if kind == "video" and call is not None:
            batch, frames = stock_argument(stock, args, kwargs, "pixel_values_videos").shape[:2]
            call.item_crops = [frames] * batch
            if recording(self._illava.state) and "video_slots" in call.work:
                self._video_feature_rows(call, batch, frames, out.pooler_output.shape[1])
        return out

    # ---------------------------------------------------------------------------- images
    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        def stock(features, newline):
            return super(IllavaLlavaOnevisionModel, self).pack_image_features(
                features, image_sizes, newline, vision_aspect_ratio
            )

        return self._pack_anyres(stock, image_features, image_sizes, image_newline, vision_aspect_ratio)

    # ---------------------------------------------------------------------------- videos
    def apply_pooling(self, image_features):
        call = current_call(self._illava.state)
        trace = call.work.get("crops") if call is not None else None
        side = self._side()
        frames = image_features.shape[0]
        if call is not None:
            call.crops, call.tokens = frames, frames * side**2
        stock_cells = math.ceil(side / 2) ** 2
        if trace is None:
            if call is not None and recording(self._illava.state):
                trace = CropTrace.start(frames, side**2, image_features.device)
                cells = math.ceil(side / 2)
                slots = [
                    pool_survivors(p[:, None].float(), p // side, p % side, (side, side), (cells, cells))[3]
                    for p in trace.positions
                ]
                call.work["video_slots"] = (trace, torch.stack(slots))
            return super().apply_pooling(image_features)
        k = image_features.shape[1]
        cells = math.ceil(math.sqrt(k) / 2)
        pooled = image_features.new_full((frames, stock_cells, image_features.shape[-1]), float("nan"))
        slots = []
        for i, (f, p) in enumerate(zip(image_features, trace.positions)):
            means, _, _, slot = pool_survivors(f, p // side, p % side, (side, side), (cells, cells))
            pooled[i, : means.shape[0]] = means
            slots.append(slot)
        call.work["video_slots"] = (trace, torch.stack(slots))
        return pooled

    def _video_feature_rows(self, call, batch: int, frames: int, per_video: int) -> None:
        trace, slots = call.work["video_slots"]
        side = self._side()
        cells = math.ceil(side / 2) ** 2
        frame = torch.arange(batch * frames)
        row = (frame // frames) * per_video + (frame % frames) * cells
        assign = trace.assign.cpu()
        feature = torch.where(assign >= 0, slots.cpu().gather(1, assign.clamp(min=0)) + row[:, None], -1)
        call.trace = unit_trace(trace, [(side, side)] * (batch * frames), feature.flatten())


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


class LlavaOnevisionAdapter(Adapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    config_types = ("llava_onevision",)
    unit = 1
    renumber_positions = True
    counts_depend_on_weights = True  # row-end tokens and unpadding follow where survivors lie
    # the authors' settings for LLaVA-OneVision-7B (docs/method.md)
    presets = {
        "llava_onevision": {
            "reference": {"encoder_depth": 26, "tokens_per_crop": 729, "llm_depth": 28},
            "image": {"encoder_layers": (5, 6, 7, 8), "encoder_removal": 92, "llm_layers": (8,), "llm_keep_ratio": 0.7},
            "video": {"encoder_layers": (3, 4, 5, 6), "encoder_removal": 92, "llm_layers": (2,), "llm_keep_ratio": 0.7},
        }
    }

    def dimensions(self, model) -> Dimensions:
        return vit_dimensions(model)

    def check(self, model, config) -> None:
        if config.encoder_layers and model.config.vision_feature_select_strategy != "full":
            raise ValueError(
                "illava: the encoder stage needs vision_feature_select_strategy='full' (every encoder token is a "
                f"patch); this model uses {model.config.vision_feature_select_strategy!r}"
            )

    def patch(self, model, record) -> None:
        record.swap(model.model, IllavaLlavaOnevisionModel)
        layers = model.model.vision_tower.encoder.layers
        for i in record.state.config.encoder_layers:
            record.swap(layers[i], IllavaViTLayer, layer=i)

    # ------------------------------------------------------------------------------ tools
    architectures = {
        "llava-onevision-qwen2-0.5b": lambda: llava_onevision_config("0.5b"),
        "llava-onevision-qwen2-7b": lambda: llava_onevision_config("7b"),
        "llava-onevision-qwen2-72b": lambda: llava_onevision_config("72b"),
    }

    def image_processor(self, config):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        size = config.vision_config.image_size
        return LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints]
        )

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        import numpy as np
        from transformers import BatchFeature

        processor = image_processor or self.image_processor(config)
        per_sample = [p.count("<image>") for p in prompts]
        if sum(per_sample) != len(images) or sum(p.count("<video>") for p in prompts) != len(videos):
            raise ValueError("the number of <image>/<video> markers must match the images/videos given")
        data, texts = {}, list(prompts)
        if images:
            pix = processor(list(images), return_tensors="pt")
            data["pixel_values"], data["image_sizes"] = pix["pixel_values"], pix["image_sizes"]
            data["batch_num_images"] = torch.tensor([n for n in per_sample if n > 0])
            sizes = iter(pix["image_sizes"].tolist())
            token = placeholder(tokenizer, config.image_token_id, "<image>")
            texts = []
            for prompt, n in zip(prompts, per_sample):
                for _ in range(n):
                    count = image_token_count(config, next(sizes), single_crop=n > 1)
                    prompt = prompt.replace("<image>", "\0" * count, 1)
                texts.append(prompt.replace("\0", token))
        if videos:
            lengths = {len(v) for v in videos}
            if len(lengths) != 1:
                raise ValueError("all videos of a batch need the same number of frames")
            data["pixel_values_videos"] = torch.stack([_video_pixels(v, processor, np) for v in videos])
            side = config.vision_config.image_size // config.vision_config.patch_size
            count = lengths.pop() * math.ceil(side / 2) ** 2 + 1
            token = placeholder(tokenizer, config.video_token_id, "<video>")
            texts = [t.replace("<video>", token * count) for t in texts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        data.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return BatchFeature(data)

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        import numpy as np

        vc = model.config.vision_config
        side, ps = vc.image_size // vc.patch_size, vc.patch_size
        span = side * ps
        processor = self.image_processor(model.config)
        mean, std = mean_std or (processor.image_mean, processor.image_std)
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        crops = [c for item in pixels for c in item] if kind == "video" else None
        grid = np.arange(side * side).reshape(side, side)
        items, unit = [], 0
        sizes = inputs.get("image_sizes")
        for n, count in enumerate(call.item_crops):
            views = crops[unit // side**2 : unit // side**2 + count] if kind == "video" else pixels[n][:count]
            images = [unnormalise(v, mean, std)[:span, :span] for v in views]
            if kind == "video":
                items.append([Panel(f"frame {f}", im, grid + unit + f * side**2, ps) for f, im in enumerate(images)])
            else:
                items.append(anyres_panels(model.config, images, sizes[n].tolist(), unit))
            unit += count * side**2
        return items

    def flops_dims(self, config) -> FlopsDims:
        vc, tc = config.vision_config, config.text_config
        return FlopsDims(
            encoder=LayerDims(
                vc.hidden_size, vc.intermediate_size, vc.num_attention_heads, vc.num_attention_heads, False
            ),
            encoder_depth=vc.num_hidden_layers,
            projector_macs_per_token=vc.hidden_size * tc.hidden_size + tc.hidden_size * tc.hidden_size,
            text=LayerDims.of_decoder(tc),
            text_depth=tc.num_hidden_layers,
            vocab=tc.vocab_size,
        )

    tiny = {"tiny-llava-onevision": lambda: tiny_llava_onevision_config()}


def image_token_count(config, image_size, single_crop: bool = False) -> int:
    """Placeholders stock transformers uses for one image of ``(height, width)`` pixels, computed
    by the stock ``pack_image_features`` on one-channel zeros (follows the installed transformers)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    crops = (
        1
        if single_crop
        else mlo.image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vc.image_size)
    )
    stub = type("Stub", (), {"config": config})()
    _, lens = mlo.LlavaOnevisionModel.pack_image_features(
        stub,
        [torch.zeros(crops, side * side, 1)],
        torch.tensor([list(image_size)]),
        torch.zeros(1),
        config.vision_aspect_ratio,
    )
    return int(lens[0])


def _video_pixels(frames, processor, np) -> torch.Tensor:
    """``(frames, 3, H, W)`` as the LLaVA-OneVision video processor makes them: resized, normalised."""
    from PIL import Image

    size = processor.size
    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    out = []
    for frame in frames:
        img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
        img = img.convert("RGB").resize((size["width"], size["height"]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((arr - mean) / std)
    return torch.from_numpy(np.stack(out))


# SigLIP-so400m as used by LLaVA-OneVision (last layer removed: 26 layers), 384 px, patch 14.
_SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
_QWEN2 = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 152000, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152128, "tie_word_embeddings": False},
    "72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 152128, "tie_word_embeddings": False},
}  # fmt: skip


def _pinpoints(base: int, max_tiles: int = 6) -> list[list[int]]:
    return [[base * i, base * j] for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)]


def llava_onevision_config(size: str = "0.5b"):
    """LLaVA-OneVision-Qwen2 ``0.5b``, ``7b`` or ``72b`` with the published dimensions."""
    from transformers import LlavaOnevisionConfig

    if size not in _QWEN2:
        raise ValueError(f"unknown LLaVA-OneVision size {size!r}; choose one of {sorted(_QWEN2)}")
    text = {
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        **_QWEN2[size],
    }
    return LlavaOnevisionConfig(
        vision_config=dict(_SIGLIP_SO400M),
        text_config=text,
        image_token_id=151646,
        video_token_id=151647,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_pinpoints(384),
        tie_word_embeddings=_QWEN2[size]["tie_word_embeddings"],
    )


def tiny_llava_onevision_config(vocab_size: int = 256, **vision):
    """A LLaVA-OneVision small enough for CPU tests: 64 px crops of 8x8 patches (64 tokens each),
    a 6-layer SigLIP and a 4-layer Qwen2 with grouped-query attention. Token ids match
    ``illava.tools.inputs.word_tokenizer`` (``<image>`` 1, ``<video>`` 2)."""
    from transformers import LlavaOnevisionConfig

    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
        "vision_use_head": False,
        **vision,
    }
    text_config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=1,
        video_token_id=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_pinpoints(vision_config["image_size"], 3),
        tie_word_embeddings=True,
    )
