"""The decoder side: slots the encoder stage emptied, and the LLM stage (docs/method.md).

Everything runs through hooks on the stock decoder modules, so transformers' own decoder loop,
attention implementations and cache objects do the work. Per decoder call (a prefill, a decoding
step, or the continuation of a cached conversation) one ``Chunk`` holds what the hooks share:

- the decoder-input hook removes the placeholder slots whose feature the encoder stage removed
  (their rows are NaN, ``illava.encoder.stock_count_features``), per sample, keeping each row's
  padding side; positions are renumbered as if the prompt had been built with fewer placeholders
  (``adapter.renumber_positions``, LLaVA-style) or kept (M-RoPE: the survivors' own positions);
- the scoring hook on the attention of layer ``k-1`` measures the attention the last token of
  every sequence (one query row each; several when sequences are packed in one row) pays to every
  token of the chunk;
- the hook on decoder layer ``k`` keeps ``llm_keep_ratio`` of each visual span, recycles the rest
  (the configuration's policy), and hands that layer and every later one the survivors' own
  positions and rotary embeddings (gathered from the decoder input, whatever merges came
  before) and an attention mask that transformers' ``create_causal_mask`` builds for the shorter
  sequence against each layer's cache;
- the decoder-output hook writes the last hidden states back at the input positions (a removed
  position gets the state of the last kept token before it), so logits line up with the input
  tokens and ``labels`` work as with stock; then it appends the chunk to the cache's ``Session``.

The cache (``IllavaDynamicCache``) reports the conversation's stock length, so ``generate`` and
chat loops slice and position new tokens as with stock, while each group of layers keeps the
mask of what it physically caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)

from .config import keep_count
from .encoder import call_of
from .merge import query_scores
from .patch import Hook, PatchRecord
from .peers import received_from_all
from .state import ForwardTrace, IllavaState, LLMLayerStats, VisualItem


# ------------------------------------------------------------------------------------ scoring
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard rotary embedding (``x * cos + rotate_half(x) * sin``); cos/sin ``(B, L, hd)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_query_key(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings, rows: torch.Tensor) -> tuple:
    """Post-RoPE queries of the tokens at ``rows`` ``(B, S)`` -> ``(B, H, S, hd)`` and all keys
    ``(B, Hkv, L, hd)``, for Llama-style attention modules (``q_proj``/``k_proj``, optional
    ``q_norm``/``k_norm``). ``hidden`` is the normalised input of the attention module."""
    b, n, _ = hidden.shape
    hd = attn.head_dim
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    q = attn.q_proj(gather_seq(hidden, rows)).view(b, rows.shape[1], -1, hd)
    k = attn.k_proj(hidden).view(b, n, -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = rotate(q.transpose(1, 2), gather_seq(cos, rows), gather_seq(sin, rows))
    k = rotate(k.transpose(1, 2), cos, sin)
    return q, k, attn.scaling


# ------------------------------------------------------------------------------------ tensors
def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence dimension (dim 1) of ``(B or 1, L, ...)`` with ``index`` ``(B, L')``."""
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``(B, L)`` or multi-axis ``(A, B, L)`` position ids along the sequence."""
    if positions.dim() == 2:
        return positions.expand(index.shape[0], -1).gather(1, index)
    axes = positions.shape[0]
    return positions.expand(axes, index.shape[0], -1).gather(2, index[None].expand(axes, -1, -1))


def compact(keep: torch.Tensor, pad_left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept tokens of each row in order, and the new padding mask.

    Rows are aligned right (padding on the left, as generation needs) or, with ``pad_left=False``,
    left. Padding slots point at tokens that were not kept. At least one slot remains (a padding
    slot, when nothing is kept: a prefill chunk that holds only removed placeholders).
    """
    length = max(1, int(keep.sum(1).max()))
    if pad_left:
        index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - length :]
    else:
        index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :length]
    return index, keep.gather(1, index)


def segment_cumsum(x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of ``x`` ``(B, L)`` restarting at every new value of ``segments``."""
    total = x.long().cumsum(1)
    before = total - x.long()
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    base = torch.where(start, before, torch.zeros_like(before)).cummax(1).values
    return total - base


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _cache_key(kwargs: dict) -> str:
    return "past_key_values" if "past_key_values" in kwargs and "cache" not in kwargs else "cache"


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


# ------------------------------------------------------------------------------------ cache
@dataclass
class Session:
    """What a cache holds physically, per group of decoder layers (a group starts at an LLM merge
    layer and caches the sequence reduced there)."""

    groups: tuple[int, ...]  # first decoder layer of every group, 0 first
    masks: list[torch.Tensor]  # per group: (B, cached length) True for real tokens
    positions: list[torch.Tensor]  # per group: (B, cached length) stock position of every slot, -1: padding
    shift: torch.Tensor  # (B,) placeholder slots removed so far (for renumbered positions)
    offset: int = 0  # stock (logical) length minus the physical length of group 0

    def group_of(self, layer: int) -> int:
        return max(g for g, start in enumerate(self.groups) if start <= layer)

    def with_groups(self, starts) -> Session:
        """Groups split at ``starts`` too; a new group caches what its layers cached so far."""
        groups = tuple(sorted(set(self.groups) | set(starts)))
        old = [self.group_of(start) for start in groups]
        return Session(groups, [self.masks[g] for g in old], [self.positions[g] for g in old], self.shift, self.offset)

    def past_masks(self, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """What every group may attend to in its cache: real tokens the caller's 2D ``mask`` (over
        the stock positions) does not mask out."""
        if mask is None:
            return self.masks
        mask = mask.bool()
        return [m & (p >= 0) & mask.to(m.device).gather(1, p.clamp(min=0)) for m, p in zip(self.masks, self.positions)]

    def rows(self, index: torch.Tensor) -> None:
        self.masks = [m[index.to(m.device)] for m in self.masks]
        self.positions = [p[index.to(p.device)] for p in self.positions]
        self.shift = self.shift[index.to(self.shift.device)]


class IllavaDynamicCache(DynamicCache):
    """A ``DynamicCache`` whose layers hold a reduced sequence (``illava: Session``).

    ``get_seq_length()`` is the stock length: the tokens of the conversation as given, which is
    what ``generate``, chat loops and M-RoPE use to slice and position new tokens. Attention masks
    use each layer's physical length (``get_query_offset``, ``get_mask_sizes``).
    """

    illava: Session | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length() + (self.illava.offset if self.illava is not None else 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self.illava.masks = [m[:, :tokens_to_remove] for m in self.illava.masks]
            self.illava.positions = [p[:, :tokens_to_remove] for p in self.illava.positions]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.illava.rows(torch.arange(self.illava.shift.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.illava.rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.illava.rows(beam_idx)


# ------------------------------------------------------------------------------------ the chunk
@dataclass
class Chunk:
    """What the hooks of one decoder call share."""

    cache: object
    session: Session | None
    groups: tuple[int, ...]
    past: list[torch.Tensor]  # per group: mask of the cache before this call
    fed: int  # tokens given to the decoder
    pad_left: bool
    packed: bool  # no mask, no cache: several sequences per row, told apart by positions
    input_index: torch.Tensor  # (B, n0) fed position of every decoder-input token
    removed: torch.Tensor  # (B, fed) slots removed at the decoder input
    # the current sequence
    mask: torch.Tensor  # (B, n) real tokens
    spans: torch.Tensor  # (B, n) visual span, -1 elsewhere (and for the last token of a sequence)
    segments: torch.Tensor  # (B, n) sequence within the row, -1 padding
    index: torch.Tensor  # (B, n) decoder-input index of every token
    reduce_at: set[int]  # layers at which this call removes visual tokens
    group_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> this call's mask there
    group_index: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> its decoder-input indices
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, S, n)
    before: dict[int, tuple] = field(default_factory=dict)  # layer -> sequence before its merge
    base: dict | None = field(default_factory=dict)  # layer type -> decoder-input position ids and rotary embeddings
    origin: torch.Tensor | None = None  # (B, n0) stock position of every decoder-input token
    input_blocks: torch.Tensor | None = None  # (B, n0) bidirectional block of every decoder-input token, -1: none
    input_segments: torch.Tensor | None = None  # (B, n0) sequence of every decoder-input token (packed rows)
    kwargs_cache: dict = field(default_factory=dict)  # (group, layer type) -> layer kwargs
    changed: bool = False
    done: bool = False  # the decoder call returned (what runs now is a recomputation)
    # viz: [(layer, (B, fed) token representing every fed position, (B, n) fed position of every token)]
    trace: list | None = None

    @property
    def segment_count(self) -> int:
        return int(self.segments.max()) + 1 if self.segments.numel() else 1

    def query_rows(self) -> torch.Tensor:
        """``(B, S)`` index of the last token of every sequence of every row."""
        n = self.segments.shape[1]
        position = torch.arange(n, device=self.segments.device)
        rows = [torch.where(self.segments == s, position, -1).max(1).values for s in range(self.segment_count)]
        return torch.stack(rows, 1).clamp(min=0)

    def mask_positions(self) -> torch.Tensor | None:
        """Positions that make transformers find the packed sequences again (``packed`` only)."""
        if not self.packed:
            return None
        ones = torch.ones_like(self.segments)
        return segment_cumsum(ones, self.segments) - 1


class LLMStage:
    """Attaches the decoder-side hooks of one model (see the module docstring)."""

    def __init__(self, state: IllavaState, decoder: torch.nn.Module, adapter):
        self.state = state
        self.decoder = decoder
        self.adapter = adapter

    def attach(self, record: PatchRecord, inner: torch.nn.Module) -> None:
        opener = OpenScope(self.state)
        record.hook(inner, opener, "pre")
        record.hook(inner, CloseScope(self.state, opener), "post", always=True)
        decoder_input = DecoderInput(self.state, self.adapter)
        record.hook(self.decoder, decoder_input, "pre")
        record.hook(self.decoder, DecoderOutput(self.state, decoder_input), "post", always=True)
        for i, layer in enumerate(self.decoder.layers):
            if i > 0:
                record.hook(layer, LayerInput(self.state, self.decoder.config, i), "pre")
        for k in self.state.config.llm_layers:
            attention = self.adapter.scoring_attention(self.decoder.layers[k - 1])
            record.hook(attention, Score(self.state, self.adapter, k, _window(self.decoder.config, k - 1)), "pre")


class OpenScope(Hook):
    """Opens this thread's call scope at the inner model (``CloseScope`` closes it, also on errors)."""

    def __call__(self, module, args, kwargs):
        if not self.state.config.enabled or self.state.current() is not None:
            return None
        scope = self.state.open_scope(owner=self)
        outputs = kwargs.get("mm_encoder_outputs") or {}
        scope.encoder_outputs.update({kind: out for kind, out in outputs.items() if out is not None})
        return None


class CloseScope(Hook):
    def __init__(self, state: IllavaState, opener: OpenScope):
        super().__init__(state)
        self.opener = opener

    def __call__(self, module, args, kwargs, output):
        self.state.close_scope(owner=self.opener)
        return None


class DecoderInput(Hook):
    def __init__(self, state: IllavaState, adapter):
        super().__init__(state)
        self.adapter = adapter

    def __call__(self, module, args, kwargs):
        state = self.state
        cache = _cache_of(kwargs)
        session = cache.illava if isinstance(cache, IllavaDynamicCache) else None
        if session is None and not state.config.enabled:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if session is None:
                return None
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
        scope = state.current() or state.open_scope(owner=self)  # a scope of its own: disabled, reduced cache
        b, q = embeds.shape[:2]
        device = embeds.device
        # a model that prepares the decoder's masks itself (a mapping per layer type: Gemma 3) gets them
        # built again for the shorter sequence; the adapter knows the 2D mask and bidirectional blocks
        prepared = isinstance(kwargs.get("attention_mask"), dict)
        mask, blocks = self.adapter.decoder_masks(scope, kwargs)
        two_d = mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2)
        valid = torch.ones(b, q, dtype=torch.bool, device=device)
        if mask is not None and two_d:
            valid = mask[:, -q:].to(device=device, dtype=torch.bool)
        positions = kwargs.get("position_ids")
        packed = mask is None and cache is None and positions is not None
        segments = _segments(positions, valid, packed)
        spans, items = visual_spans(state, scope, b, q, device)
        removed = (spans >= 0) & embeds[..., 0].isnan()
        if items:
            lost = torch.bincount(spans[removed], minlength=len(items)).tolist()
            _item_stats(state, scope, items, lost, q)
        spans = _exclude_last(spans, segments)
        reduce_at = _llm_reduces(state.config, spans, removed)
        if session is None and not removed.any() and not reduce_at:
            state.close_scope(owner=self)
            return None  # nothing to remove: the decoder runs exactly as stock
        if not two_d:
            raise ValueError(
                "illava needs a 2D attention mask (or none) while tokens are reduced; precomputed 4D masks and "
                "static/compiled caches are not supported"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if cache is None and _wants_cache(kwargs, module.config):
            cache = IllavaDynamicCache(config=module.config)
            kwargs[_cache_key(kwargs)] = cache
        groups = (0, *sorted(state.config.llm_layers)) if state.config.llm_active else (0,)
        if cache is not None:
            session = _session(cache, session, groups, mask, b, past, device)
            groups = session.groups
        if session is not None and mask is not None and mask.shape[1] != past + q:
            raise ValueError(
                f"illava: the attention mask covers {mask.shape[1]} tokens, but the cache holds {past} and {q} are new"
            )
        empty = torch.zeros(b, 0, dtype=torch.bool, device=device)
        past_masks = session.past_masks(mask) if session is not None else [empty] * len(groups)
        # positions as the decoder would compute them, then renumbered for the removed slots
        if positions is None:
            positions = (torch.arange(q, device=device) + past)[None].expand(b, q)
        shift = segment_cumsum(removed, segments)
        if session is not None:
            shift = shift + session.shift.to(device)[:, None]
        if self.adapter.renumber_positions:
            positions = positions - shift.to(positions.dtype)
        elif positions.dim() == 3 and positions.shape[0] == 4:  # the text axis serves masks only
            positions = torch.cat([positions[:1] - shift.to(positions.dtype), positions[1:]])
        pad_left = not bool((~valid[:, -1]).any())
        if removed.any():
            index, new_valid = compact(valid & ~removed, pad_left)
            # padding slots point at dropped tokens: their NaN must not reach attention (0 * NaN)
            kwargs["inputs_embeds"] = gather_seq(embeds, index).masked_fill(~new_valid[..., None], 0.0)
            positions = gather_positions(positions.to(device), index)
            spans = spans.gather(1, index).masked_fill(~new_valid, -1)
            segments = segments.gather(1, index).masked_fill(~new_valid, -1)
            self.adapter.gather_decoder_inputs(kwargs, index)
        else:
            index, new_valid = torch.arange(q, device=device)[None].expand(b, q), valid
        kwargs["position_ids"] = positions
        if blocks is not None:  # (B, T) over the stock sequence from its start, as stock reads them
            blocks = blocks.to(device)
            blocks = torch.nn.functional.pad(blocks, (0, max(0, past + q - blocks.shape[1])), value=-1)
            blocks = blocks[:, past : past + q].gather(1, index).masked_fill(~new_valid, -1)
        full = torch.cat([past_masks[0].to(device), new_valid], 1)
        keep_none = mask is None and session is None and bool(full.all())
        kwargs["attention_mask"] = None if keep_none else full.long()
        chunk = Chunk(
            cache=cache,
            session=session,
            groups=groups,
            past=[m.to(device) for m in past_masks],
            fed=q,
            pad_left=pad_left,
            packed=packed and keep_none,
            input_index=index,
            removed=removed,
            mask=new_valid,
            spans=spans,
            segments=segments,
            index=torch.arange(index.shape[1], device=device)[None].expand(b, -1),
            reduce_at=reduce_at,
            changed=bool(removed.any()),
            origin=index + past,
            input_blocks=blocks,
            input_segments=segments,
        )
        chunk.group_masks[0], chunk.group_index[0] = new_valid, chunk.index
        if prepared:
            hidden = kwargs["inputs_embeds"]
            types = list(getattr(module.config, "layer_types", None) or ["full_attention"])
            kwargs["attention_mask"] = {
                t: _attention_mask(chunk, 0, t, hidden, types.index(t), module.config) for t in dict.fromkeys(types)
            }
        scope.stats.sequence_after_encoder = index.shape[1]
        if scope.record:
            _start_trace(state, scope, chunk)
        scope.chunk = chunk
        return args, kwargs


class DecoderOutput(Hook):
    """Ends the decoder call: the cache's session takes the chunk; outputs line up with the input."""

    def __init__(self, state: IllavaState, opener: DecoderInput):
        super().__init__(state)
        self.opener = opener

    def __call__(self, module, args, kwargs, output):
        scope = self.state.current()
        chunk = scope.chunk if scope is not None else None
        if chunk is None:
            return None
        scope.chunk = None
        self.state.close_scope(owner=self.opener)
        # the decoder's own tensors key the chunk (recomputation): the chunk must not keep them alive
        chunk.done, chunk.base = True, {}
        if output is None:
            return None
        session = chunk.session
        if session is not None:
            past = session.positions[0].shape[1] + session.offset
            origin = chunk.input_index + past
            mask, index, masks, positions = chunk.group_masks[0], chunk.group_index[0], [], []
            for g in range(len(chunk.groups)):
                mask, index = chunk.group_masks.get(g, mask), chunk.group_index.get(g, index)
                stock = origin.gather(1, index.to(origin.device)).masked_fill(~mask, -1)
                masks.append(torch.cat([session.masks[g].to(mask.device), mask], 1))
                positions.append(torch.cat([session.positions[g].to(stock.device), stock], 1))
            session.masks, session.positions = masks, positions
            session.shift = session.shift + chunk.removed.sum(1).to(session.shift.device)
            session.offset += chunk.fed - chunk.input_index.shape[1]
        if chunk.changed:
            hidden = output.last_hidden_state
            b = hidden.shape[0]
            origin = chunk.input_index.gather(1, chunk.index)
            slot = torch.where(chunk.mask, origin, chunk.fed)
            where = torch.full((b, chunk.fed + 1), -1, dtype=torch.long, device=hidden.device)
            where.scatter_(1, slot, torch.arange(slot.shape[1], device=hidden.device).expand(b, -1))
            latest = where[:, : chunk.fed].cummax(1).values.clamp(min=0)  # last kept token at or before
            output.last_hidden_state = gather_seq(hidden, latest)
        return output


class Score(Hook):
    """Pre-hook on the attention of layer ``k-1``: the attention the last token of every sequence
    pays to every token (one query row per sequence), for the merge before layer ``k``."""

    def __init__(self, state: IllavaState, adapter, k: int, window: int | None = None):
        super().__init__(state)
        self.adapter = adapter
        self.k = k
        self.window = window  # layer k-1 attends over a sliding window (in stock positions)

    def __call__(self, module, args, kwargs):
        chunk = self.state.chunk()
        if chunk is None or self.k not in chunk.reduce_at or self.k in chunk.scores:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = chunk.query_rows()
        sequences = torch.arange(rows.shape[1], device=hidden.device)
        key_mask = (chunk.segments[:, None, :] == sequences[None, :, None]) & chunk.mask[:, None, :]
        if self.window is not None:  # only the keys the query's window holds
            stock = chunk.origin.gather(1, chunk.index).to(hidden.device)
            key_mask &= stock.gather(1, rows)[:, :, None] - stock[:, None, :] < self.window
        key_mask[:, :, 0] |= ~key_mask.any(-1)  # a row without that sequence: any key (never used)
        with torch.no_grad():  # a selection signal: no gradient flows through which tokens are kept
            if self.state.policy.llm_query == "all":  # every query scores (FastV)
                every = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
                query, key, scale = self.adapter.query_key(module, hidden, kwargs["position_embeddings"], every)
                received = received_from_all(query, key, scale, chunk.mask, chunk.segments)
                chunk.scores[self.k] = received[:, None].expand(-1, rows.shape[1], -1)
            else:
                query, key, scale = self.adapter.query_key(module, hidden, kwargs["position_embeddings"], rows)
                chunk.scores[self.k] = query_scores(query, key, scale, key_mask)
        return None


class LayerInput(Hook):
    """Pre-hook on decoder layer ``i``: the merge when ``i`` is an LLM merge layer, and the inputs of
    the (shorter) sequence the layer's group caches."""

    def __init__(self, state: IllavaState, config, i: int):
        super().__init__(state)
        self.config = config
        self.i = i
        types = getattr(config, "layer_types", None)
        self.layer_type = types[i] if types else "full_attention"

    def __call__(self, module, args, kwargs):
        embeddings = kwargs.get("position_embeddings")
        key = embeddings[0] if isinstance(embeddings, tuple) else None
        # gradient checkpointing runs layers again during backward: find the call by its tensors
        chunk = self.state.keyed.get(key) if key is not None else None
        if chunk is None:
            chunk = self.state.chunk()
            if chunk is None:
                return None
            if key is not None:
                self.state.keyed[key] = chunk
        g = max(n for n, start in enumerate(chunk.groups) if start <= self.i)
        if g == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.layer_type not in chunk.base and not chunk.done:
            chunk.base[self.layer_type] = (kwargs.get("position_ids"), embeddings)
        if self.i == chunk.groups[g] and self.i in chunk.reduce_at:
            hidden = reduce(self.state, chunk, self.i, g, hidden)
        chunk.group_masks.setdefault(g, chunk.mask)
        chunk.group_index.setdefault(g, chunk.index)
        kwargs.update(_layer_kwargs(chunk, g, self.layer_type, hidden, self.i, self.config))
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs


# ------------------------------------------------------------------------------------ the merge
def reduce(state: IllavaState, chunk: Chunk, k: int, g: int, hidden: torch.Tensor) -> torch.Tensor:
    """Keep ``llm_keep_ratio`` of every visual span before layer ``k`` and recycle the rest.

    Run again for the same call (gradient checkpointing), it takes the same decisions from the
    recorded scores and sequence, and only recomputes the values.
    """
    cfg, policy = state.config, state.policy
    commit = k not in chunk.before
    mask, spans, segments, index = chunk.before.get(k, (chunk.mask, chunk.spans, chunk.segments, chunk.index))
    scores = chunk.scores.get(k)
    if scores is None:
        raise RuntimeError(f"illava: no scores for LLM merge layer {k}: the scoring hook of layer {k - 1} did not run")
    scores = scores.to(hidden.device)
    token_scores = policy.scores("llm", scores.gather(1, segments.clamp(min=0)[:, None]).squeeze(1))
    b, n, _ = hidden.shape
    keep = mask.clone()
    updated = hidden.clone()
    ratio = cfg.keep_ratio_at(k)
    tracing = commit and chunk.trace is not None
    step = torch.arange(n, device=hidden.device).expand(b, n).clone() if tracing else None
    visual_in, visual_out = [], []
    for row in range(b):
        ids = spans[row]
        count_in = count_out = 0
        for item in torch.unique(ids[ids >= 0]).tolist():
            idx = (ids == item).nonzero().squeeze(1)
            total = idx.numel()
            kept = keep_count(total, ratio)
            count_in, count_out = count_in + total, count_out + kept
            if kept == total:
                continue
            res = policy.reduce("llm", hidden[row, idx][None], token_scores[row, idx][None], total - kept, cfg)
            survivors = idx[res.kept[0]]
            updated[row, survivors] = res.tokens[0]
            keep[row, idx] = False
            keep[row, survivors] = True
            if tracing:
                assign = res.assign[0]
                step[row, idx] = torch.where(assign >= 0, survivors[assign.clamp(min=0)], -1)
        visual_in.append(count_in)
        visual_out.append(count_out)
    new_index, new_mask = compact(keep, chunk.pad_left)
    out = gather_seq(updated, new_index)
    if commit:
        chunk.before[k] = (mask, spans, segments, index)
        chunk.mask = new_mask
        chunk.spans = spans.gather(1, new_index).masked_fill(~new_mask, -1)
        chunk.segments = segments.gather(1, new_index).masked_fill(~new_mask, -1)
        chunk.index = index.gather(1, new_index)
        chunk.group_masks[g], chunk.group_index[g] = new_mask, chunk.index
        chunk.changed = True
        scope = state.current()
        if scope is not None:
            scope.stats.llm.append(LLMLayerStats(k, visual_in, visual_out, n, out.shape[1]))
        if tracing:
            _extend_trace(chunk, k, step, new_index, new_mask)
    return out


def _layer_kwargs(chunk: Chunk, g: int, layer_type: str, hidden, i: int, config) -> dict:
    """Positions, rotary embeddings and mask of the sequence group ``g`` caches (built once per call)."""
    key = (g, layer_type)
    if key not in chunk.kwargs_cache:
        out = {}
        if chunk.before:  # a merge in this call: the survivors' own positions and embeddings
            positions, embeddings = chunk.base[layer_type]
            out["position_embeddings"] = tuple(gather_seq(t, chunk.index.to(t.device)) for t in embeddings)
            if positions is not None:
                out["position_ids"] = gather_positions(positions, chunk.index.to(positions.device))
        out["attention_mask"] = _attention_mask(chunk, g, layer_type, hidden, i, config)
        chunk.kwargs_cache[key] = out
    return {name: _to(value, hidden.device) for name, value in chunk.kwargs_cache[key].items()}


def _window(config, layer: int) -> int | None:
    types = getattr(config, "layer_types", None)
    sliding = bool(types) and types[layer] == "sliding_attention"
    return getattr(config, "sliding_window", None) if sliding else None


def _attention_mask(chunk: Chunk, g: int, layer_type: str, hidden, i: int, config):
    """The mask of decoder layer ``i`` (group ``g``, ``layer_type``) for the sequence the group caches.

    Sliding windows are measured in *stock* positions: a query attends to the survivors among the
    keys stock would attend to (a slot-based window would reach further back once tokens are gone).
    Tokens of one bidirectional block (the adapter's ``decoder_masks``: Gemma 3's images) attend to
    each other both ways, as stock composes it: ``window AND (causal OR block)``. Without either, the
    plain causal mask of transformers.
    """
    device = hidden.device
    mask2d = torch.cat([chunk.past[g].to(device), chunk.group_masks[g].to(device)], 1)
    window = _window(config, i) if layer_type == "sliding_attention" else None
    if window is None and chunk.input_blocks is None:
        make = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        return make(
            config=config,
            inputs_embeds=hidden,
            attention_mask=None if chunk.packed else mask2d,
            cache=chunk.cache,
            position_ids=chunk.mask_positions(),
            layer_idx=i,
        )
    index, valid = chunk.group_index[g].to(device), chunk.group_masks[g].to(device)
    b, past = valid.shape[0], chunk.past[g].shape[1]
    cached = chunk.session.positions[g].to(device) if chunk.session is not None else None
    if cached is None or cached.shape[1] != past:
        cached = torch.full((b, past), -1, dtype=torch.long, device=device)
    stock = torch.cat([cached, chunk.origin.to(device).gather(1, index).masked_fill(~valid, -1)], 1)
    conditions = []
    if window is not None:
        conditions.append(lambda bi, h, qi, ki: stock[bi, qi] - stock[bi, ki] < window)
    if chunk.packed:  # several sequences per row (no cache): keep them apart
        seg = chunk.input_segments.to(device).gather(1, index).masked_fill(~valid, -1)
        conditions.append(lambda bi, h, qi, ki: seg[bi, qi] == seg[bi, ki])
    both = None
    if chunk.input_blocks is not None:
        blocks = chunk.input_blocks.to(device).gather(1, index).masked_fill(~valid, -1)
        blocks = torch.cat([torch.full((b, past), -1, dtype=torch.long, device=device), blocks], 1)

        def both(bi, h, qi, ki):
            return (blocks[bi, qi] == blocks[bi, ki]) & (blocks[bi, qi] >= 0)

    def within(bi, h, qi, ki):
        ok = conditions[0](bi, h, qi, ki)
        for condition in conditions[1:]:
            ok = ok & condition(bi, h, qi, ki)
        return ok

    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None if chunk.packed else mask2d,
        cache=chunk.cache,
        position_ids=None,
        or_mask_function=both,
        and_mask_function=within if conditions else None,
        layer_idx=i,
    )


# ------------------------------------------------------------------------------------ helpers
def visual_spans(state: IllavaState, scope, b: int, q: int, device) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """``(B, q)`` visual item of every input position (-1: text), and ``(kind, row, stock tokens)``
    of every item, from the placeholder masks the forward used. Items are split by the lengths of
    the encoder output when the adapter can tell them, else by runs of consecutive placeholders."""
    spans = torch.full((b, q), -1, dtype=torch.long, device=device)
    items: list[tuple[str, int, int]] = []
    if scope is None:
        return spans, items
    found = []
    for kind, mask in scope.placeholders.items():
        if tuple(mask.shape) != (b, q):
            continue
        where = mask.to(device).nonzero()  # row-major: the order stock fills features in
        if not where.shape[0]:
            continue
        lengths = state.adapter.item_lengths(kind, scope.encoder_outputs.get(kind))
        if lengths is None or sum(lengths) != where.shape[0]:
            new = torch.ones(where.shape[0], dtype=torch.bool, device=device)
            new[1:] = (where[1:, 0] != where[:-1, 0]) | (where[1:, 1] != where[:-1, 1] + 1)
            starts = new.nonzero().flatten().tolist() + [where.shape[0]]
            lengths = [e - s for s, e in zip(starts[:-1], starts[1:])]
        start = 0
        for n in lengths:
            found.append((int(where[start, 0]), int(where[start, 1]), kind, where[start : start + n]))
            start += n
    for row, _, kind, positions in sorted(found, key=lambda f: (f[0], f[1])):
        spans[positions[:, 0], positions[:, 1]] = len(items)
        items.append((kind, row, positions.shape[0]))
    return spans, items


def _item_stats(state, scope, items: list[tuple[str, int, int]], lost: list[int], q: int) -> None:
    stats = scope.stats
    stats.sequence_in = stats.sequence_after_encoder = q
    stats.encoder, stats.items, crops = [], [], {}
    for kind in ("image", "video"):
        call = call_of(state, scope.encoder_outputs.get(kind))
        if call is not None:
            stats.encoder.append(call.as_stats())
        crops[kind] = list(call.item_crops) if call is not None else []
    counts = {kind: sum(1 for item in items if item[0] == kind) for kind in crops}
    # tokens per crop, when every crop of the call yields the same number (tiles that the encoder
    # cannot group into images: an image's crops are then its tokens / tokens per crop)
    per_crop = {}
    for kind in crops:
        total = sum(n for k, _, n in items if k == kind)
        call = call_of(state, scope.encoder_outputs.get(kind))
        if call is not None and call.crops and total % call.crops == 0:
            per_crop[kind] = total // call.crops
    ordinal = dict.fromkeys(crops, 0)
    for (kind, row, n), gone in zip(items, lost):
        if len(crops[kind]) == counts[kind]:
            crop = crops[kind][ordinal[kind]]
        else:
            crop = n // per_crop[kind] if kind in per_crop and n % per_crop[kind] == 0 else None
        ordinal[kind] += 1
        stats.items.append(VisualItem(kind, row, n, n - gone, crop))
    scope.published = True


def _segments(positions, valid: torch.Tensor, packed: bool) -> torch.Tensor:
    """Sequence of every token within its row (-1: padding): one per row, unless sequences are
    packed in one row without a mask, which transformers tells apart by position resets."""
    segments = torch.zeros_like(valid, dtype=torch.long)
    if packed:
        text = positions if positions.dim() == 2 else (positions[0] if positions.shape[0] == 4 else None)
        found = find_packed_sequence_indices(text.expand(valid.shape[0], -1)) if text is not None else None
        if found is not None:
            segments = found.to(valid.device)
    return segments.masked_fill(~valid, -1)


def _exclude_last(spans: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The last token of every sequence is never removed by the LLM stage: it is the scorer."""
    last = torch.zeros_like(spans, dtype=torch.bool)
    last[:, :-1] = segments[:, :-1] != segments[:, 1:]
    last[:, -1] = True
    return spans.masked_fill(last & (segments >= 0), -1)


def _llm_reduces(cfg, spans: torch.Tensor, removed: torch.Tensor) -> set[int]:
    """The LLM merge layers at which some visual span loses tokens."""
    if not cfg.llm_active:
        return set()
    kept = (spans >= 0) & ~removed
    counts = torch.bincount(spans[kept]).tolist() if kept.any() else []
    counts = [n for n in counts if n]
    layers = set()
    for k in sorted(cfg.llm_layers):
        after = [keep_count(n, cfg.keep_ratio_at(k)) for n in counts]
        if after != counts:
            layers.add(k)
        counts = after
    return layers


def _session(cache, session: Session | None, groups, mask, b: int, past: int, device) -> Session:
    if session is None:
        if type(cache) not in (DynamicCache, IllavaDynamicCache):
            raise ValueError(
                f"illava: reducing tokens needs a DynamicCache (generate's default), got {type(cache).__name__}"
            )
        cached = torch.ones(b, past, dtype=torch.bool, device=device)
        positions = torch.arange(past, device=device).expand(b, past)
        session = Session((0,), [cached], [positions], torch.zeros(b, dtype=torch.long, device=device))
        cache.__class__ = IllavaDynamicCache
    session = session.with_groups(groups)
    cache.illava = session
    return session


def _wants_cache(kwargs: dict, config) -> bool:
    use_cache = kwargs.get("use_cache")
    return bool(config.use_cache if use_cache is None else use_cache)


def _start_trace(state, scope, chunk: Chunk) -> None:
    """``illava.tools.viz``: the decoder-input token of every fed position (-1: removed slot)."""
    b, fed = chunk.removed.shape
    device = chunk.removed.device
    inverse = torch.full((b, fed + 1), -1, dtype=torch.long, device=device)
    slot = torch.where(chunk.mask, chunk.input_index, fed)
    inverse.scatter_(1, slot, torch.arange(slot.shape[1], device=device).expand(b, -1))
    chunk.trace = [(0, inverse[:, :fed].masked_fill(chunk.removed, -1), chunk.input_index.masked_fill(~chunk.mask, -1))]
    calls = {kind: call_of(state, scope.encoder_outputs.get(kind)) for kind in ("image", "video")}
    scope.stats.trace = ForwardTrace(
        calls={kind: call for kind, call in calls.items() if call is not None},
        placeholders={kind: mask.cpu() for kind, mask in scope.placeholders.items()},
        llm=chunk.trace,
    )


def _extend_trace(chunk: Chunk, k: int, step: torch.Tensor, new_index: torch.Tensor, new_mask: torch.Tensor) -> None:
    b, n = step.shape
    inverse = torch.full((b, n + 1), -1, dtype=torch.long, device=step.device)
    slot = torch.where(new_mask, new_index, n)
    inverse.scatter_(1, slot, torch.arange(new_index.shape[1], device=step.device).expand(b, -1))
    new_of = torch.where(step >= 0, inverse.gather(1, step.clamp(min=0)), -1)
    previous = chunk.trace[-1][1]
    origin = chunk.input_index.gather(1, chunk.index).masked_fill(~chunk.mask, -1)
    chunk.trace.append((k, torch.where(previous >= 0, new_of.gather(1, previous.clamp(min=0)), -1), origin))
