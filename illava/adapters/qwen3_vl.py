"""iLLaVA for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``.

Qwen3-VL's vision transformer is Qwen2-VL's (packed frames, ``cu_seqlens`` per frame, a patch
merger folding every 2x2 block of 4 consecutive tokens into one LLM token, full attention in every
block), so the encoder stage and the layout of survivors are ``illava.adapters.qwen_vl``'s: whole
2x2 blocks are removed per frame, the merger output is written back at the stock count (NaN rows),
the decoder input gathers the survivors' own interleaved M-RoPE positions (the rotary embedding
interleaves the (t, h, w) sections per token: gathering whole rows keeps it exact). The MoE variant
shares every module this adapter touches (only the decoder MLP differs).

**Deepstack.** The hidden states of a few vision blocks (``deepstack_visual_indexes``, 8, 16, 24 of
27 for the 8B) each go through their own merger, and the results are added to the hidden states
of the first decoder layers' outputs at the visual positions. With the encoder stage they follow
the main tokens exactly:

- the hidden states taken at block ``d`` are those of the blocks present after every merge up to
  ``d`` (merges at or before ``d`` act on them as on the main stream);
- every later merge removes the same blocks from them and recycles them with the same weights as
  the main tokens (the policy's combination, probed with an identity appended to the blocks:
  ``qwen_vl._merge_blocks``; no gradient flows through these weights);
- the deepstack mergers run once, at the end of the vision call, on the survivors, and their output
  is written back at the stock count with NaN rows where the main features are NaN (the feature
  stage's selection too), so stock code splits and joins them unchanged;
- at the decoder input, ``gather_decoder_inputs`` drops the visual positions whose slot was removed
  from ``visual_pos_masks`` and the matching deepstack rows; after an LLM merge layer, the deepstack
  features added at later layers follow the kept tokens (gathered, not recycled: a token the LLM
  stage removes takes its deepstack features with it).

Videos: Qwen3-VL's processor separates the frames of a video with timestamps (``<t seconds>
<|vision_start|> frame <|vision_end|>``) and positions each temporal patch as a separate grid;
``build_inputs`` delimits every temporal patch with its own ``<|vision_start|>`` / ``<|vision_end|>``
(no timestamp text).
"""

from __future__ import annotations

import torch

from ..encoder import current_call, stock_argument, stock_count_features
from ..llm import gather_seq
from ..patch import Hook
from .base import FlopsDims, LayerDims, placeholder
from .qwen_vl import IllavaQwenVLModel, QwenVLAdapter, _expand, _tokenized, _video_pixels


class IllavaQwen3VLModel(IllavaQwenVLModel):
    """Qwen3-VL model: as Qwen2-VL's, and the deepstack features of removed tokens are NaN too.

    Modifications: after the feature call, deepstack rows are set to NaN where the main feature row
    is NaN (the feature stage selects among the main features only); videos run in one feature call
    (stock's ``get_video_features`` calls ``get_image_features``). Disabled: stock.
    """

    def _illava_encode(self, kind, call, stock, args, kwargs):
        if kind == "video":  # stock runs videos through ``self.get_image_features``: one call, not nested
            videos, grid, extra = (
                stock_argument(stock, args, kwargs, name)
                for name in ("pixel_values_videos", "video_grid_thw", "kwargs")
            )
            return self._illava_original.get_image_features(self, videos, grid, **extra)
        return stock(self, *args, **kwargs)

    def _illava_finish(self, kind, output):
        return _mask_deepstack(output)


def _mask_deepstack(output):
    features, deepstack = getattr(output, "pooler_output", None), getattr(output, "deepstack_features", None)
    if getattr(output, "illava_call", None) is None or not deepstack or not isinstance(features, (list, tuple)):
        return output
    removed = [f[:, 0].isnan() for f in features]
    if not any(r.any() for r in removed):
        return output
    output.deepstack_features = [
        type(layer)(d.masked_fill(r[:, None].to(d.device), float("nan")) for d, r in zip(layer, removed))
        for layer in deepstack
    ]
    return output


class IllavaDeepstackMerger:
    """A deepstack merger during the encoder stage: its input (the hidden states after block ``d``)
    is kept for later merges and the merger runs at the end of the call (``FinishDeepstack``).
    Disabled, or outside a feature call: stock forward."""

    def forward(self, x):
        state = self._illava.state
        call = current_call(state) if state.config.encoder_active else None
        run = call.work.get("run") if call is not None else None
        if run is None:
            return super().forward(x)
        run.companions[self._illava.layer] = (x, len(run.steps))
        return x[:0]  # a placeholder: FinishDeepstack writes the features of the call

    def stock_forward(self, x):
        return super().forward(x)


class FinishDeepstack(Hook):
    """Forward hook on the vision transformer: the deepstack features of the survivors, after every
    merge of the call, at the stock number of LLM tokens (NaN rows for removed blocks)."""

    def __call__(self, module, args, kwargs, output):
        call = current_call(self.state)
        run = call.work.get("run") if call is not None else None
        if run is None or not run.companions:
            return None
        total = sum(int(t * h * w) for t, h, w in run.grid_thw.tolist()) // run.unit
        blocks = run.last()
        features = []
        for i in sorted(run.companions):
            hidden, first = run.companions[i]
            x = hidden.reshape(-1, run.unit * hidden.shape[-1])
            for count, groups in run.steps[first:]:
                new = x.new_zeros(count, x.shape[-1])
                for index, rows, weights in groups:
                    old = x[index.to(x.device)].float()
                    new = new.index_put(
                        (rows.flatten().to(x.device),), (weights.float() @ old).flatten(0, 1).to(x.dtype)
                    )
                x = new
            out = module.deepstack_merger_list[i].stock_forward(x.reshape(-1, hidden.shape[-1]))
            if blocks is not run.initial:
                out = stock_count_features(out, blocks.block_ids.to(out.device), total)
            features.append(out)
        run.companions.clear()
        output.deepstack_features = features
        return output


class IllavaQwen3TextModel:
    """Qwen3-VL decoder: the deepstack features added after a layer follow the tokens the LLM stage
    kept before it. Modifications: ``_deepstack_process`` gathers the visual mask and the deepstack
    rows of the current (shorter) sequence. Disabled, or no LLM merge so far in this call: stock."""

    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        chunk = self._illava.state.chunk()
        if chunk is not None and chunk.before and chunk.index.shape[1] == hidden_states.shape[1]:
            index = chunk.index.to(visual_pos_masks.device)
            order = (visual_pos_masks.flatten().long().cumsum(0) - 1).view(visual_pos_masks.shape)
            picked = visual_pos_masks.gather(1, index) & chunk.mask.to(index.device)
            rows = order.gather(1, index)[picked]
            visual_pos_masks, visual_embeds = picked, visual_embeds[rows.to(visual_embeds.device)]
        return super()._deepstack_process(hidden_states, visual_pos_masks, visual_embeds)


class Qwen3VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    config_types = ("qwen3_vl", "qwen3_vl_moe")
    model_mixin = IllavaQwen3VLModel
    # Our choice, by the principle of Qwen2-VL-7B's published settings (blocks 12-15 of 32 remove 16%
    # each; LLM layers 6, 7, 8 of 28 keep 0.9): the same relative depths in Qwen3-VL-8B (27 blocks,
    # 36 decoder layers). Merges after deepstack block 8 recycle the deepstack features alike.
    _TABLE = {
        "reference": {"encoder_depth": 27, "tokens_per_crop": 0, "llm_depth": 36},
        "image": {"encoder_layers": (10, 11, 12, 13), "encoder_removal": 0.16,
                  "llm_layers": (8, 9, 10), "llm_keep_ratio": 0.9},
    }  # fmt: skip
    presets = {"qwen3_vl": _TABLE, "qwen3_vl_moe": _TABLE}

    def check(self, model, config) -> None:
        super().check(model, config)
        depth = model.config.vision_config.depth
        bad = [layer for layer in config.encoder_layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"IllavaConfig.encoder_layers: Qwen3-VL has vision blocks 0-{depth - 1}; got {bad}")

    def patch(self, model, record) -> None:
        super().patch(model, record)
        inner = model.model
        visual = inner.visual
        state = record.state
        record.swap(inner.language_model, IllavaQwen3TextModel)
        if state.config.encoder_layers:
            for i, merger in enumerate(visual.deepstack_merger_list):
                record.swap(merger, IllavaDeepstackMerger, layer=i)
            record.hook(visual, FinishDeepstack(state), "post")

    def gather_decoder_inputs(self, kwargs: dict, index: torch.Tensor) -> None:
        """``visual_pos_masks`` and ``deepstack_visual_embeds`` of the kept tokens. A slot of
        ``index`` holds a visual token if the stock mask says so there and its deepstack row is
        not NaN (removed tokens' rows are NaN; padding slots point at removed or padding tokens)."""
        mask, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if mask is None:
            return
        mask = mask.to(index.device)
        order = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)
        picked = gather_seq(mask, index)
        rows = gather_seq(order, index)[picked]
        if embeds:
            present = ~embeds[0][rows.to(embeds[0].device), 0].isnan().to(index.device)
            kept = picked.clone()
            kept[picked] = present
            picked = kept
            rows = rows[present]
            embeds = [e[rows.to(e.device)] for e in embeds]
        kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = picked, embeds

    # ------------------------------------------------------------------------------ tools
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
        if sum(p.count("<image>") for p in prompts) != len(images) or sum(p.count("<video>") for p in prompts) != len(
            videos
        ):
            raise ValueError("the number of <image>/<video> markers must match the images/videos given")
        processor = image_processor or self.image_processor(config)
        merge = config.vision_config.spatial_merge_size**2
        packed = [_video_pixels(v, processor) for v in videos]
        # one marker per temporal patch, then expanded like images
        frames = iter(t for _, (t, _, _) in packed)
        texts = []
        for prompt in prompts:
            parts = prompt.split("<video>")
            texts.append(parts[0] + "".join("<video>" * next(frames) + part for part in parts[1:]))
        counts = iter([h * w // merge for _, (t, h, w) in packed for _ in range(t)])
        token = placeholder(tokenizer, config.video_token_id, "<video>")
        texts = [_expand(t, "<video>", counts, token) for t in texts]
        data = {}
        if images:
            pix = processor(list(images), return_tensors="pt")
            data.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
            counts = iter((pix["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [
                _expand(t, "<image>", counts, placeholder(tokenizer, config.image_token_id, "<image>")) for t in texts
            ]
        data["pixel_values_videos"] = torch.cat([p for p, _ in packed])
        data["video_grid_thw"] = torch.tensor([g for _, g in packed])
        return _tokenized(tokenizer, texts, config, data)

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
