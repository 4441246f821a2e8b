"""Token reduction at the input of the decoder and inside it (the LLM stage).

All of it runs through forward pre-hooks on the stock modules, so transformers' own decoder loop,
attention implementations (eager, SDPA, FlashAttention) and cache objects do the work:

- a pre-hook on the decoder (e.g. ``Qwen2Model``) removes the placeholder slots the encoder stage
  left without a feature: the sequence is shortened per sample and re-left-padded; positions are
  renumbered as if the prompt had been built with the shorter visual spans (the authors' setting);
- a pre-hook on the attention of layer ``k-1`` scores every token by the attention the last prompt
  token pays it (one query row; padding excluded);
- a pre-hook on decoder layer ``k`` keeps ``llm_keep_ratio`` of each visual span, recycles the
  rest, and gathers hidden states, position ids and rotary embeddings of the survivors (kept tokens
  keep their original positions); it builds the mask for the shorter sequence with transformers'
  ``create_causal_mask`` against the cache of layer ``k``, and hands the same inputs to every later
  layer. Layers ``>= k`` therefore cache the reduced sequence.

The reduction lives on the cache object (``cache._illava_session``), so decoding steps, which come
with the full-length attention mask that ``generate`` keeps, are mapped onto each layer's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .config import keep_count
from .merge import compose_assign, last_query_scores, merge
from .state import IllavaState, LLMLayerStats

QueryKeyFn = Callable[[torch.nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], tuple]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard rotary embedding (``x * cos + rotate_half(x) * sin``); cos/sin ``(B, L, hd)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_query_key(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple:
    """Post-RoPE query of the last token ``(B, H, 1, hd)`` and keys ``(B, Hkv, L, hd)``.

    For Llama-style attention modules (``q_proj``/``k_proj``, optional ``q_norm``/``k_norm``).
    ``hidden`` is the normalised input of the attention module.
    """
    b, n, _ = hidden.shape
    hd = attn.head_dim
    cos, sin = position_embeddings
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    q = attn.q_proj(hidden[:, -1:]).view(b, 1, -1, hd)
    k = attn.k_proj(hidden).view(b, n, -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = rotate(q.transpose(1, 2), cos[:, -1:], sin[:, -1:])
    k = rotate(k.transpose(1, 2), cos, sin)
    return q, k, attn.scaling


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept tokens of each row, right-aligned (left padding), in order.

    Returns ``index`` ``(B, L')`` and the new padding mask ``(B, L')`` with ``L'`` the longest row.
    Padding slots point at tokens that were not kept, so their values stay finite.
    """
    length = int(keep.sum(1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    index = order[:, keep.shape[1] - length :]
    return index, keep.gather(1, index)


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence dimension (dim 1) of ``(B, L, ...)``."""
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def _gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``(B, L)`` or multi-axis ``(A, B, L)`` position ids along the sequence."""
    if position_ids.dim() == 2:
        return position_ids.expand(index.shape[0], -1).gather(1, index)
    axes = position_ids.shape[0]
    expanded = position_ids.expand(axes, index.shape[0], -1)
    return expanded.gather(2, index[None].expand(axes, -1, -1))


@dataclass
class Session:
    """What one prefill reduced; kept on the cache so that decoding steps can follow it."""

    full_length: int  # sequence length as given at prefill (2D mask length)
    shift: torch.Tensor | None  # (B,) placeholder slots removed at the decoder input, per sample
    prefix_masks: dict[int, torch.Tensor]  # first layer of a group -> its 2D padding mask at prefill
    prefill: bool = True
    # prefill only
    item_ids: torch.Tensor | None = None
    mask2d: torch.Tensor | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    current: dict | None = None  # reduced layer inputs handed to every later layer
    # decoding step only
    tail: torch.Tensor | None = None
    step_masks: dict = field(default_factory=dict)

    def group_of(self, layer: int) -> int:
        return max(k for k in self.prefix_masks if k <= layer)


class LLMStage:
    """Hooks that implement the decoder-input compaction and the LLM stage on one decoder."""

    def __init__(self, state: IllavaState, decoder: torch.nn.Module, query_key: QueryKeyFn = rope_query_key):
        self.state = state
        self.decoder = decoder
        self.query_key = query_key
        self.handles: list = []

    # ------------------------------------------------------------------------------ wiring
    def attach(self) -> None:
        cfg = self.state.config
        self.handles.append(self.decoder.register_forward_pre_hook(self._on_decoder_input, with_kwargs=True))
        if not cfg.llm_layers:
            return
        first = min(cfg.llm_layers)
        for i, layer in enumerate(self.decoder.layers):
            if i >= first:
                self.handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for k in cfg.llm_layers:
            attn = self.decoder.layers[k - 1].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._score_hook(k), with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ------------------------------------------------------------------------------ decoder input
    def _on_decoder_input(self, module, args, kwargs):
        state = self.state
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0:
            session = getattr(cache, "_illava_session", None)
            state.session = session
            if session is None:
                return None
            return args, self._decode_step(session, kwargs, past)
        state.session = None
        if not state.config.enabled or state.item_ids is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        state.stats.sequence_in = state.stats.sequence_after_encoder = embeds.shape[1]
        if not state.config.llm_active and (state.drop is None or not state.drop.any()):
            return None  # nothing to remove: the decoder runs exactly as stock
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError(
                "illava needs a 2D attention mask (or none); precomputed 4D masks and static/compiled "
                "caches are not supported while tokens are being reduced"
            )
        b, n = embeds.shape[:2]
        device = embeds.device
        valid = (
            mask.to(device=device, dtype=torch.bool)
            if mask is not None
            else torch.ones(b, n, dtype=torch.bool, device=device)
        )
        if (~valid[:, -1]).any():
            raise ValueError("illava needs left padding (padding_side='left'), as generation does")
        drop = state.drop.to(device) if state.drop is not None else torch.zeros_like(valid)
        item_ids = state.item_ids.to(device)
        shift = None
        if drop.any():
            index, mask2d = compact(valid & ~drop)
            embeds = _gather_seq(embeds, index)
            item_ids = item_ids.gather(1, index).masked_fill(~mask2d, -1)
            positions = kwargs.get("position_ids")
            if state.renumber_positions:
                if positions is not None:
                    positions = positions.to(device) - drop.long().cumsum(1)
                shift = drop.long().sum(1)
            if positions is not None:
                kwargs["position_ids"] = _gather_positions(positions.to(device), index)
            kwargs["inputs_embeds"] = embeds
            kwargs["attention_mask"] = mask2d.long() if (mask is not None or not mask2d.all()) else None
        else:
            mask2d = valid
        state.stats.sequence_after_encoder = embeds.shape[1]
        if cache is None and _wants_cache(kwargs, self.decoder.config):
            # created here rather than inside the decoder, so that the session can ride on it
            cache = DynamicCache(config=self.decoder.config)
            kwargs["past_key_values" if "past_key_values" in kwargs else "cache"] = cache
        session = Session(full_length=n, shift=shift, prefix_masks={0: mask2d}, item_ids=item_ids, mask2d=mask2d)
        state.session = session
        if cache is not None:
            cache._illava_session = session
        return args, kwargs

    def _decode_step(self, session: Session, kwargs: dict, past: int):
        session.prefill = False
        session.step_masks = {}
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        prefix = session.prefix_masks[0]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError("illava needs a 2D attention mask while decoding a reduced sequence")
            tail = mask[:, session.full_length :].to(device=prefix.device, dtype=torch.bool)
        else:
            tail = torch.ones(prefix.shape[0], past + q - prefix.shape[1], dtype=torch.bool, device=prefix.device)
        session.tail = tail
        if mask is not None or not prefix.all():
            kwargs["attention_mask"] = torch.cat([prefix, tail], dim=1).long()
        positions = kwargs.get("position_ids")
        if positions is not None and session.shift is not None:
            kwargs["position_ids"] = positions - session.shift.to(positions.device)[..., None]
        return kwargs

    # ------------------------------------------------------------------------------ scoring
    def _score_hook(self, k: int):
        def hook(module, args, kwargs):
            session = self.state.session
            if session is None or not session.prefill or not self.state.config.llm_active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            q, key, scale = self.query_key(module, hidden, kwargs["position_embeddings"])
            session.scores[k] = last_query_scores(q, key, scale, session.mask2d.to(hidden.device))
            return None

        return hook

    # ------------------------------------------------------------------------------ layers
    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            session = self.state.session
            if session is None:
                return None
            if not session.prefill:
                return self._decode_layer(session, i, args, kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i in self.state.config.llm_layers and self.state.config.llm_active and i in session.scores:
                hidden = self._reduce(session, i, hidden, kwargs)
            if session.current is None:
                return None
            kwargs.update({k: _to(v, hidden.device) for k, v in session.current.items()})
            return (hidden, *args[1:]), kwargs

        return hook

    def _reduce(self, session: Session, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        cfg = self.state.config
        device = hidden.device
        scores = session.scores.pop(k).to(device)
        item_ids = session.item_ids.to(device)
        valid = session.mask2d.to(device)
        b, n, _ = hidden.shape
        keep = valid.clone()
        updated = hidden.clone()
        ratio = cfg.keep_ratio_at(k)
        visual_in, visual_out = [], []
        for row in range(b):
            ids = item_ids[row]
            count_in = count_out = 0
            for item in torch.unique(ids[ids >= 0]).tolist():
                idx = (ids == item).nonzero().squeeze(1)
                total = idx.numel()
                r = total - keep_count(total, ratio)
                count_in += total
                count_out += total - r
                if r == 0:
                    self._record(k, item, total, None)
                    continue
                score = scores[row, idx].clone()
                score[idx == n - 1] = float("inf")  # the last prompt token is never removed
                res = merge(
                    hidden[row, idx][None],
                    score[None],
                    r,
                    cfg.recycle,
                    neighbours=cfg.cluster_neighbours,
                    recycle_fraction=cfg.cluster_fraction,
                )
                self._record(k, item, total, res)
                kept = idx[res.kept[0]]
                updated[row, kept] = res.tokens[0]
                keep[row, idx] = False
                keep[row, kept] = True
            visual_in.append(count_in)
            visual_out.append(count_out)
        index, mask2d = compact(keep)
        hidden = _gather_seq(updated, index)
        session.item_ids = item_ids.gather(1, index).masked_fill(~mask2d, -1)
        session.mask2d = mask2d
        session.prefix_masks[k] = mask2d
        cache = _cache_of(kwargs)
        positions = kwargs.get("position_ids")
        positions = _gather_positions(positions.to(device), index) if positions is not None else None
        cos, sin = kwargs["position_embeddings"]
        current = {
            "position_ids": positions,
            "position_embeddings": (_gather_seq(cos, index), _gather_seq(sin, index)),
        }
        current["attention_mask"] = self._mask_for(k, hidden, mask2d, cache)
        session.current = current
        self.state.stats.llm.append(LLMLayerStats(k, visual_in, visual_out, n, hidden.shape[1]))
        return hidden

    def _record(self, k: int, item: int, total: int, res) -> None:
        """Source tracking for ``illava.viz``: decoder-input token of the item -> token after layer k."""
        if not self.state.record:
            return
        steps = self.state.llm_trace.setdefault(item, [])
        assign0, kept0 = (steps[-1][1], steps[-1][2]) if steps else (torch.arange(total), torch.arange(total))
        if res is not None:
            assign0 = compose_assign(assign0[None], res.assign.cpu())[0]
            kept0 = kept0[res.kept[0].cpu()]
        steps.append((k, assign0, kept0))

    def _decode_layer(self, session: Session, i: int, args, kwargs):
        group = session.group_of(i)
        if group == 0:
            return None
        key = (group, self._layer_type(i))
        if key not in session.step_masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            prefix = session.prefix_masks[group].to(hidden.device)
            mask2d = torch.cat([prefix, session.tail.to(hidden.device)], dim=1)
            session.step_masks[key] = self._mask_for(i, hidden, mask2d, _cache_of(kwargs))
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs["attention_mask"] = _to(session.step_masks[key], hidden.device)
        return args, kwargs

    def _layer_type(self, i: int) -> str:
        types = getattr(self.decoder.config, "layer_types", None)
        return types[i] if types else "full_attention"

    def _mask_for(self, i: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache):
        """The attention mask of layer ``i`` for a reduced sequence, sized against its own cache."""
        make = create_sliding_window_causal_mask if self._layer_type(i) == "sliding_attention" else create_causal_mask
        return make(config=self.decoder.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache, layer_idx=i)


def _wants_cache(kwargs: dict, config) -> bool:
    use_cache = kwargs.get("use_cache")
    return bool(config.use_cache if use_cache is None else use_cache)


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value
