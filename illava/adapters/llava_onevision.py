"""iLLaVA for ``LlavaOnevisionForConditionalGeneration`` (SigLIP encoder + Qwen2 decoder).

What is patched (``remove`` undoes all of it):
- the SigLIP encoder layers listed in ``encoder_layers`` get the class ``IllavaSiglipLayer``;
- the inner ``LlavaOnevisionModel`` gets ``IllavaLlavaOnevisionModel`` (layout of survivors and
  placeholder bookkeeping);
- forward pre-hooks on the vision tower, the inner model and the decoder (``illava.llm``).

Layout of survivors (the authors reshaped survivors into a fake square grid; we place every
survivor at the patch it came from, its own position, not those of the tokens it absorbed):
- base view and single-crop images: survivors in raster order (+ the newline token as stock);
- AnyRes crops: survivors are placed on the full crop grid, those in the padding that stock
  ``unpad_image`` cuts away are dropped, and a newline follows every row of the unpadded grid.
  If the survivors still exceed the stock budget (the ``anyres_max_N`` rule), they are averaged
  into the cells of the grid stock transformers would downsample to;
- video frames: stock pools 27x27 -> 14x14 (``ceil(side / 2)``). With K survivors per frame we
  pool into ``ceil(sqrt(K) / 2)`` squared cells over the frame, averaging the survivors in each
  cell, so pooling shrinks the token count by the same factor as stock (361 -> 100 per frame for
  the authors' 92-token removals at four layers, their 6272 -> 3200 for 32 frames). Empty cells
  give no token, so a frame may have a few fewer tokens.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as mlo

from ..encoder import encoder_merge, pool_survivors, rows_with_newlines
from ..merge import attention_with_received_scores
from ..placeholders import PlaceholderMixin
from ..state import EncoderTrace, VisualItem
from . import Adapter, swap_class


class IllavaSiglipLayer:
    """SigLIP encoder layer with the encoder stage.

    Modifications: the attention runs with explicit softmax (eager) to obtain the attention each
    token receives, whatever ``attn_implementation`` says; after the attention residual and before
    the MLP, ``illava.encoder.encoder_merge`` removes and recycles tokens. Disabled: stock forward.
    """

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = self._illava
        if not state.config.encoder_active:
            return super().forward(hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError(
                "illava: the encoder stage does not support an attention mask in the vision encoder"
            )
        attn = self.self_attn
        residual = hidden_states
        hidden = self.layer_norm1(hidden_states)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        out, received = attention_with_received_scores(q, k, v, attn.scale)
        hidden = residual + attn.out_proj(out.reshape(*hidden.shape[:-1], -1))
        hidden = encoder_merge(state, self._illava_layer, hidden, received)
        residual = hidden
        hidden = self.mlp(self.layer_norm2(hidden))
        return residual + hidden


class IllavaLlavaOnevisionModel(PlaceholderMixin):
    """LLaVA-OneVision model with iLLaVA's layout of survivors.

    Modifications: ``pack_image_features`` and ``apply_pooling`` lay out the encoder-stage
    survivors by their source positions (module docstring); ``get_placeholder_mask`` comes from
    ``PlaceholderMixin``.
    """

    def _side(self) -> int:
        return self.config.vision_config.image_size // self.config.vision_config.patch_size

    def _encoder_stats(self, kind: str, crops: int, trace) -> dict:
        layers = trace.layers if trace is not None else []
        return {"kind": kind, "crops": crops, "tokens": crops * self._side() ** 2, "layers": layers}

    def _take_trace(self):
        trace, self._illava.encoder_trace = self._illava.encoder_trace, None
        return trace

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        state = self._illava
        trace = self._take_trace()
        crops = [f.shape[0] for f in image_features]
        if trace is None:
            packed, lens = super().pack_image_features(image_features, image_sizes, image_newline, vision_aspect_ratio)
            stock_lens = lens
        else:
            # stock counts from stock code run on one-channel zeros (cheap, and always in sync)
            dummy = [f.new_zeros(f.shape[0], self._side() ** 2, 1) for f in image_features]
            newline = image_newline[:1] if image_newline is not None else None
            _, stock_lens = super().pack_image_features(dummy, image_sizes, newline, vision_aspect_ratio)
            positions = torch.split(trace.positions, crops, dim=0)
            packed = [
                self._pack_survivors(f, p, size, image_newline, vision_aspect_ratio)[0]
                for f, p, size in zip(image_features, positions, image_sizes)
            ]
            lens = torch.tensor([p.shape[0] for p in packed], device=image_features[0].device)
        items = [
            VisualItem("image", int(s), int(n), crops=c) for s, n, c in zip(stock_lens.tolist(), lens.tolist(), crops)
        ]
        if state.record:
            self._record_images(items, trace, image_sizes, image_newline, vision_aspect_ratio)
        state.add_pending("image", items, self._encoder_stats("image", sum(crops), trace))
        return packed, lens

    def _pack_survivors(self, feature, positions, image_size, newline, aspect):
        """Survivors laid out by their source positions; also the feature index of every survivor
        of every crop ``(crops, K)``, -1 where the unpadding cut it away."""
        side = self._side()
        base = feature[0]
        crops, k, dim = feature.shape
        slots = torch.full((crops, k), -1, dtype=torch.long, device=feature.device)
        slots[0] = torch.arange(k, device=feature.device)
        if crops == 1:
            return (torch.cat([base, newline[None].to(base)]) if newline is not None else base), slots
        grid_h, grid_w = mlo.get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        crops -= 1
        crop = torch.arange(crops, device=feature.device)[:, None].expand(crops, k)
        rows = (crop // grid_w) * side + positions[1:] // side
        cols = (crop % grid_w) * side + positions[1:] % side
        # the window stock unpad_image keeps, found by running it on a grid of row/col indices
        height, width = grid_h * side, grid_w * side
        index = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
        window = mlo.unpad_image(index, image_size)
        top, left = int(window[0, 0, 0]), int(window[1, 0, 0])
        unpad_h, unpad_w = window.shape[1:]
        rows, cols = rows.flatten() - top, cols.flatten() - left
        inside = (rows >= 0) & (rows < unpad_h) & (cols >= 0) & (cols < unpad_w)
        tokens, rows, cols = feature[1:].reshape(-1, dim)[inside], rows[inside], cols[inside]
        slot = torch.arange(tokens.shape[0], device=feature.device)  # output token of each survivor inside
        max_patches = int(aspect.removeprefix("anyres_max_"))
        budget = max_patches * side**2
        if math.sqrt(tokens.shape[0] / budget) > 1.1:
            ratio = math.sqrt(unpad_h * unpad_w / budget)
            cells = (int(unpad_h // ratio), int(unpad_w // ratio))
            tokens, rows, cols, slot = pool_survivors(tokens, rows, cols, (unpad_h, unpad_w), cells)
            num_rows = cells[0]
        else:
            order = torch.argsort(rows * unpad_w + cols)
            tokens, rows, cols = tokens[order], rows[order], cols[order]
            slot[order] = torch.arange(order.numel(), device=order.device)
            num_rows = unpad_h
        if newline is not None:
            tokens, where = rows_with_newlines(tokens, rows, cols, num_rows, newline)
            slot = where[slot]
        crop_slots = torch.full((crops * k,), -1, dtype=torch.long, device=feature.device)
        crop_slots[inside] = slot + k
        slots[1:] = crop_slots.view(crops, k)
        return torch.cat([base, tokens]), slots

    def _record_images(self, items, trace, image_sizes, newline, aspect) -> None:
        """Source tracking of every image of the call (``illava.viz``)."""
        side = self._side()
        total = sum(i.crops for i in items)
        if trace is None:  # no encoder stage: every patch survives, laid out as stock lays it out
            trace = EncoderTrace.start(total, side**2, image_sizes.device)
        newline = newline[:1] if newline is not None else None
        starts = [0]
        for item in items:
            starts.append(starts[-1] + item.crops)
        for n, (item, size) in enumerate(zip(items, image_sizes)):
            sl = slice(starts[n], starts[n + 1])
            dummy = torch.zeros(item.crops, trace.positions.shape[1], 1)
            packed, slots = self._pack_survivors(dummy, trace.positions[sl].cpu(), size.cpu(), newline, aspect)
            if packed.shape[0] != item.feature_tokens:
                slots = torch.full_like(slots, -1)  # stock layout differs from ours: no mapping to tokens
            assign = trace.assign[sl].cpu()
            token0 = torch.where(assign >= 0, slots.gather(1, assign.clamp(min=0)), -1)
            item.trace = _item_trace(item, side, token0, [(la, o[sl], sc[sl]) for la, o, sc in trace.records])
            item.trace["image_size"] = tuple(int(v) for v in size)
            item.trace["grid"] = (
                mlo.get_anyres_image_grid_shape(
                    size.tolist(), self.config.image_grid_pinpoints, self.config.vision_config.image_size
                )
                if item.crops > 1
                else None
            )

    def apply_pooling(self, image_features):
        trace = self._take_trace()
        side = self._side()
        if trace is None:
            self._illava_video = (None, self._encoder_stats("video", image_features.shape[0], None), None)
            if self._illava.record:
                trace = EncoderTrace.start(image_features.shape[0], side**2, image_features.device)
                cells = math.ceil(side / 2)
                slots = [
                    pool_survivors(p[:, None].float(), p // side, p % side, (side, side), (cells, cells))[3]
                    for p in trace.positions
                ]
                self._illava_video = (None, self._illava_video[1], (trace, torch.stack(slots), cells**2))
            return super().apply_pooling(image_features)
        frames, k, _ = image_features.shape
        cells = math.ceil(math.sqrt(k) / 2)
        pooled_frames = [
            pool_survivors(f, p // side, p % side, (side, side), (cells, cells))
            for f, p in zip(image_features, trace.positions)
        ]
        per_frame = [p[0] for p in pooled_frames]
        width = max(p.shape[0] for p in per_frame)
        pooled = image_features.new_zeros(frames, width, image_features.shape[-1])
        valid = torch.zeros(frames, width, dtype=torch.bool, device=image_features.device)
        for i, p in enumerate(per_frame):
            pooled[i, : p.shape[0]] = p
            valid[i, : p.shape[0]] = True
        record = (trace, torch.stack([p[3] for p in pooled_frames]), width) if self._illava.record else None
        self._illava_video = (valid, self._encoder_stats("video", frames, trace), record)
        return pooled

    # generate() picks the arguments from the signature: keep the stock one
    def get_video_features(
        self, pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        out = super().get_video_features(
            pixel_values_videos,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )
        state = self._illava
        batch, frames = pixel_values_videos.shape[:2]
        valid, encoder_stats, record = self.__dict__.pop("_illava_video")
        side = self._side()
        stock = frames * math.ceil(side / 2) ** 2 + 1
        features = out.pooler_output.shape[1]
        items = []
        for b in range(batch):
            mask = None if valid is None else torch.cat([valid.view(batch, -1)[b], valid.new_ones(1)])
            items.append(VisualItem("video", stock, features, mask, crops=frames))
            if record is not None:
                trace, slots, width = record
                sl = slice(b * frames, (b + 1) * frames)
                # feature index of every survivor: frame * width + its cell; then rank among valid features
                feature = slots[sl].cpu() + torch.arange(frames)[:, None] * width
                rank = torch.cumsum(mask.cpu().long(), 0) - 1 if mask is not None else torch.arange(features)
                assign = trace.assign[sl].cpu()
                survivor = torch.where(assign >= 0, feature.gather(1, assign.clamp(min=0)), 0)
                token0 = torch.where(assign >= 0, rank[survivor], -1)
                items[-1].trace = _item_trace(
                    items[-1], side, token0, [(la, o[sl], sc[sl]) for la, o, sc in trace.records]
                )
        state.add_pending("video", items, encoder_stats)
        return out


def _item_trace(item: VisualItem, side: int, token0: torch.Tensor, records) -> dict:
    """``illava.viz`` source tracking of one item; units are ``crop * side**2 + patch``."""
    crops = token0.shape[0]
    offset = (torch.arange(crops) * side**2)[:, None]
    layers = []
    for layer, owner, scores in records:
        owner = owner.cpu()
        layers.append((layer, torch.where(owner >= 0, owner + offset, -1).flatten(), scores.cpu().flatten()))
    return {
        "family": "llava_onevision",
        "kind": item.kind,
        "side": side,
        "crops": crops,
        "encoder": layers,
        "token0": token0.flatten(),
        "tokens": item.tokens,
    }


class LlavaOnevisionAdapter(Adapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def family(self, model) -> str:
        return "llava_onevision"

    def parts(self, model):
        inner = model.model
        return inner, inner.vision_tower, inner.language_model

    def dimensions(self, model) -> dict:
        vc, tc = model.config.vision_config, model.config.text_config
        feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = min(feature_layer)
        depth = vc.num_hidden_layers
        return {
            "encoder_depth": depth,
            "tokens_per_crop": (vc.image_size // vc.patch_size) ** 2,
            "llm_depth": tc.num_hidden_layers,
            # hidden_states[i] is the output of layer i-1; a merge at layer l changes outputs >= l
            "feature_layer": (feature_layer % (depth + 1)) - 1,
        }

    def encoder_layers(self, model):
        return model.model.vision_tower.encoder.layers

    def patch(self, model, state) -> None:
        if state.config.encoder_layers and model.config.vision_feature_select_strategy != "full":
            raise ValueError(
                "illava: the encoder stage needs vision_feature_select_strategy='full' (every encoder token is a "
                f"patch); this model uses {model.config.vision_feature_select_strategy!r}"
            )
        inner = model.model
        swap_class(inner, IllavaLlavaOnevisionModel, state)
        layers = self.encoder_layers(model)
        for i in state.config.encoder_layers:
            swap_class(layers[i], IllavaSiglipLayer, state)
            layers[i]._illava_layer = i

    def hooks(self, model, state) -> list:
        def reset_trace(module, args):
            state.encoder_trace = None

        return [model.model.vision_tower.register_forward_pre_hook(reset_trace)]
