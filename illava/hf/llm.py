"""The LLM stage on a transformers decoder: hooks that execute ``illava.plan.llm`` (docs/method.md).

Everything runs through hooks on the stock decoder modules, so transformers' own decoder loop,
attention implementations and cache objects do the work. Per decoder call (a prefill, a decoding
step, or the continuation of a cached conversation) one ``Chunk`` holds what the hooks share:

- ``DecoderInput`` (pre-hook on the decoder) removes the placeholder slots whose feature the
  encoder stage removed (their rows are NaN, ``illava.hf.encoder.stock_count_features``), per sample,
  keeping each row's padding side; positions are renumbered as if the prompt had been built with
  fewer placeholders (``adapter.renumber_positions``, LLaVA-style) or kept (M-RoPE: the survivors'
  own positions);
- ``Score`` (pre-hook on the attention of layer ``k-1``) measures the attention the last token of
  every sequence (one query row each; several when sequences are packed in one row) pays to every
  token of the chunk;
- ``LayerInput`` (pre-hook on decoder layer ``k``) keeps ``llm_keep_ratio`` of each visual span,
  recycles the rest (the configuration's policy), and hands that layer and every later one the
  survivors' own positions and rotary embeddings and an attention mask built by transformers for
  the shorter sequence against each layer's cache (``illava.hf.masks``);
- ``DecoderOutput`` (hook on the decoder) writes the last hidden states back at the input positions
  (a removed position gets the state of the last kept token before it), so logits line up with the
  input tokens and ``labels`` work as with stock; then it appends the chunk to the cache's
  ``Session`` (``illava.hf.cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..merge import query_scores
from ..patch import Hook, PatchRecord
from ..peers import received_from_all
from ..plan import llm as plan
from ..plan.llm import Sequence, gather_seq
from ..state import ForwardTrace, IllavaState, LLMLayerStats, VisualItem
from .cache import IllavaDynamicCache, Session, open_session
from .encoder import call_of
from .masks import attention_mask, layer_kwargs, window
from .rope import rope_query_key


def item_lengths(kind: str, output) -> list[int] | None:
    """Feature rows of every image / video in an encoder output (``pooler_output`` a list per item,
    or a tensor with one row per item); ``None`` if the output does not tell."""
    features = getattr(output, "pooler_output", None)
    if isinstance(features, (list, tuple)):
        return [int(f.shape[0]) for f in features]
    if isinstance(features, torch.Tensor) and features.dim() == 3:
        return [int(features.shape[1])] * features.shape[0]
    return None


def own_masks(scope, kwargs: dict) -> tuple:
    """The decoder's own 2D ``attention_mask``, causal (no bidirectional blocks)."""
    return kwargs.get("attention_mask"), None


@dataclass(frozen=True)
class DecoderFamily:
    """What the LLM stage reads of a model's family, handed to its hooks when they are registered
    (``Adapter.decoder_family``), so that no hook asks the adapter during a forward. The defaults
    fit Llama-style decoders; a family gives its own where it differs:

    - ``scoring_attention(layer)``: the attention module of a decoder layer (hooked to score);
    - ``renumber_positions``: survivors renumbered (LLaVA-style) or keep their own (M-RoPE);
    - ``query_key(attn, hidden, position_embeddings, rows)``: the scoring query / key (RoPE);
    - ``item_lengths(kind, output)``: how the features split into images / videos;
    - ``decoder_masks(scope, kwargs)``: the 2D padding mask and bidirectional blocks (Gemma 3);
    - ``gather_decoder_inputs(kwargs, index)``: extra inputs gathered with the kept tokens (Qwen3-VL).
    """

    scoring_attention: Callable[[torch.nn.Module], torch.nn.Module]
    renumber_positions: bool = True
    query_key: Callable = rope_query_key
    item_lengths: Callable = item_lengths
    decoder_masks: Callable = own_masks
    gather_decoder_inputs: Callable | None = None


# ------------------------------------------------------------------------------------ the chunk
@dataclass
class Fed:
    """A decoder call's input as the decoder received it after ``DecoderInput``."""

    count: int  # tokens given to the decoder
    index: torch.Tensor  # (B, n0) fed position of every decoder-input token
    removed: torch.Tensor  # (B, count) slots removed at the decoder input
    origin: torch.Tensor  # (B, n0) stock position of every decoder-input token
    blocks: torch.Tensor | None  # (B, n0) bidirectional block of every decoder-input token, -1: none
    pad_left: bool
    packed: bool  # no mask, no cache: several sequences per row, told apart by positions


@dataclass
class Chunk:
    """What the hooks of one decoder call share: the plan's state and transformers' machinery."""

    fed: Fed
    seq: Sequence  # the current sequence
    reduce_at: set[int]  # layers at which this call removes visual tokens
    cache: object
    session: Session | None
    groups: tuple[int, ...]
    past: list[torch.Tensor]  # per group: mask of the cache before this call
    group_seq: dict[int, Sequence] = field(default_factory=dict)  # group -> the sequence it caches
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, S, n)
    before: dict[int, Sequence] = field(default_factory=dict)  # layer -> sequence before its merge
    base: dict = field(default_factory=dict)  # layer type -> decoder-input position ids and rotary embeddings
    kwargs_cache: dict = field(default_factory=dict)  # (group, layer type) -> layer kwargs
    done: bool = False  # the decoder call returned (what runs now is a recomputation)
    # viz: [(layer, (B, fed) token representing every fed position, (B, n) fed position of every token)]
    trace: list | None = None


class LLMStage:
    """Attaches the decoder-side hooks of one model (see the module docstring)."""

    def __init__(self, state: IllavaState, decoder: torch.nn.Module, family: DecoderFamily):
        self.state = state
        self.decoder = decoder
        self.family = family

    def attach(self, record: PatchRecord, inner: torch.nn.Module) -> None:
        opener = OpenScope(self.state)
        record.hook(inner, opener, "pre")
        record.hook(inner, CloseScope(self.state, opener), "post", always=True)
        decoder_input = DecoderInput(self.state, self.family)
        record.hook(self.decoder, decoder_input, "pre")
        record.hook(self.decoder, DecoderOutput(self.state, decoder_input), "post", always=True)
        for i, layer in enumerate(self.decoder.layers):
            if i > 0:
                record.hook(layer, LayerInput(self.state, self.decoder.config, i), "pre")
        for k in self.state.config.llm_layers:
            attention = self.family.scoring_attention(self.decoder.layers[k - 1])
            record.hook(attention, Score(self.state, self.family, k, window(self.decoder.config, k - 1)), "pre")


class OpenScope(Hook):
    """Opens this thread's call scope at the inner model (``CloseScope`` closes it, also on errors)."""

    def __call__(self, module, args, kwargs):
        if not self.state.config.enabled or self.state.current() is not None:
            return None
        self.state.open_scope(owner=self).adopt(kwargs)
        return None


class CloseScope(Hook):
    def __init__(self, state: IllavaState, opener: OpenScope):
        super().__init__(state)
        self.opener = opener

    def __call__(self, module, args, kwargs, output):
        self.state.close_scope(owner=self.opener)
        return None


# ------------------------------------------------------------------------------------ decoder input
@dataclass
class _Input:
    """What ``DecoderInput`` reads of a decoder call before deciding anything."""

    embeds: torch.Tensor  # (B, q, D)
    mask: torch.Tensor | None  # the 2D padding mask over cached + new tokens (or what the caller gave)
    blocks: torch.Tensor | None  # (B, T) bidirectional blocks from the start of the sequence
    valid: torch.Tensor  # (B, q) real tokens
    positions: torch.Tensor | None
    packed: bool
    seq: Sequence  # the input sequence (spans exclude the last token of every sequence)
    removed: torch.Tensor  # (B, q) placeholder slots the encoder stage emptied
    prepared: bool  # the model handed the decoder prepared masks (a mapping per layer type)

    @property
    def two_d(self) -> bool:
        return self.mask is None or (isinstance(self.mask, torch.Tensor) and self.mask.dim() == 2)


class DecoderInput(Hook):
    def __init__(self, state: IllavaState, family: DecoderFamily):
        super().__init__(state)
        self.family = family

    def compiled(self, module, args, kwargs):
        _refuse_reduced_cache(kwargs)
        return None

    def __call__(self, module, args, kwargs):
        state = self.state
        cache = _cache_of(kwargs)
        session = cache.illava if isinstance(cache, IllavaDynamicCache) else None
        if session is None and not state.config.enabled:
            return None
        if kwargs.get("inputs_embeds") is None:
            if session is None:
                return None
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, module.get_input_embeddings()(kwargs["input_ids"])
        scope = state.current() or state.open_scope(owner=self)  # a scope of its own: disabled, reduced cache
        read = self._read(scope, kwargs, cache)
        reduce_at = plan.reducing_layers(state.config, read.seq.spans, read.removed)
        if session is None and not read.removed.any() and not reduce_at:
            if scope.record:  # the encoder calls' source tracking still serves (illava.tools.schedule)
                scope.stats.trace = ForwardTrace(calls=_encoder_calls(state, scope), placeholders={}, llm=[])
            state.close_scope(owner=self)
            return None  # nothing to remove: the decoder runs exactly as stock
        if not read.two_d:
            raise ValueError(
                "illava needs a 2D attention mask (or none) while tokens are reduced; precomputed 4D masks and "
                "static caches are not supported"
            )
        chunk = self._chunk(module, kwargs, cache, session, read, reduce_at)
        if read.prepared:
            self._prepare_masks(module, kwargs, chunk)
        scope.stats.sequence_after_encoder = chunk.fed.index.shape[1]
        if scope.record:
            _start_trace(state, scope, chunk)
        scope.chunk = chunk
        return args, kwargs

    def _read(self, scope, kwargs: dict, cache) -> _Input:
        """The call's masks, sequences and visual spans; publishes the prefill's item statistics."""
        embeds = kwargs["inputs_embeds"]
        b, q = embeds.shape[:2]
        device = embeds.device
        # a model that prepares the decoder's masks itself (a mapping per layer type: Gemma 3) gets them
        # built again for the shorter sequence; the adapter knows the 2D mask and bidirectional blocks
        prepared = isinstance(kwargs.get("attention_mask"), dict)
        mask, blocks = self.family.decoder_masks(scope, kwargs)
        valid = torch.ones(b, q, dtype=torch.bool, device=device)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid = mask[:, -q:].to(device=device, dtype=torch.bool)
        positions = kwargs.get("position_ids")
        packed = mask is None and cache is None and positions is not None
        segments = plan.packed_segments(_text_positions(positions), valid, packed)
        spans, items = plan.visual_spans(self._placeholders(scope, b, q), b, q, device)
        removed = (spans >= 0) & embeds[..., 0].isnan()
        if items:
            lost = torch.bincount(spans[removed], minlength=len(items)).tolist()
            _item_stats(self.state, scope, items, lost, q)
        spans = plan.exclude_last(spans, segments)
        index = torch.arange(q, device=device)[None].expand(b, q)
        seq = Sequence(valid, spans, segments, index)
        return _Input(embeds, mask, blocks, valid, positions, packed, seq, removed, prepared)

    def _placeholders(self, scope, b: int, q: int) -> list:
        """Per kind: the placeholder mask the forward used and the lengths of its items."""
        found = []
        for kind, mask in scope.placeholders.items():
            if tuple(mask.shape) == (b, q):
                found.append((kind, mask, self.family.item_lengths(kind, scope.encoder_outputs.get(kind))))
        return found

    def _chunk(self, module, kwargs: dict, cache, session, read: _Input, reduce_at: set[int]) -> Chunk:
        """Opens the cache's session, compacts the input, renumbers positions; the call's ``Chunk``."""
        b, q = read.valid.shape
        device = read.valid.device
        past = cache.get_seq_length() if cache is not None else 0
        cache, session, groups = self._session(module, kwargs, cache, session, read, past)
        positions = read.positions
        if positions is None:
            positions = (torch.arange(q, device=device) + past)[None].expand(b, q)
        shift = plan.shift(read.removed, read.seq.segments, session.shift if session is not None else None)
        kwargs["position_ids"] = self._renumber(positions, shift)
        pad_left = not bool((~read.valid[:, -1]).any())
        index, seq = self._compact(kwargs, read, pad_left)
        empty = torch.zeros(b, 0, dtype=torch.bool, device=device)
        past_masks = session.past_masks(read.mask) if session is not None else [empty] * len(groups)
        full = torch.cat([past_masks[0].to(device), seq.mask], 1)
        keep_none = read.mask is None and session is None and bool(full.all())
        kwargs["attention_mask"] = None if keep_none else full.long()
        blocks = _input_blocks(read.blocks, past, q, index, seq.mask)
        fed = Fed(q, index, read.removed, index + past, blocks, pad_left, read.packed and keep_none)
        chunk = Chunk(fed, seq, reduce_at, cache, session, groups, [m.to(device) for m in past_masks])
        chunk.group_seq[0] = seq
        return chunk

    def _session(self, module, kwargs: dict, cache, session, read: _Input, past: int) -> tuple:
        """The cache (a new one when the call wants one and has none), its session split at the
        merge layers, and the groups of layers."""
        b, q = read.valid.shape
        if cache is None and _wants_cache(kwargs, module.config):
            cache = IllavaDynamicCache(config=module.config)
            kwargs[_cache_key(kwargs)] = cache
        cfg = self.state.config
        groups = (0, *sorted(cfg.llm_layers)) if cfg.llm_active else (0,)
        if cache is not None:
            session = open_session(cache, session, groups, b, past, read.valid.device)
            groups = session.groups
        if session is not None and read.mask is not None and read.mask.shape[1] != past + q:
            covered = read.mask.shape[1]
            raise ValueError(
                f"illava: the attention mask covers {covered} tokens, but the cache holds {past} and {q} are new"
            )
        return cache, session, groups

    def _compact(self, kwargs: dict, read: _Input, pad_left: bool) -> tuple[torch.Tensor, Sequence]:
        """Drops the slots the encoder stage emptied from the decoder's inputs: the fed position of
        every decoder-input token and the input sequence."""
        if not read.removed.any():
            return read.seq.index, read.seq
        index, valid = plan.compact(read.valid & ~read.removed, pad_left)
        # padding slots point at dropped tokens: their NaN must not reach attention (0 * NaN)
        kwargs["inputs_embeds"] = gather_seq(read.embeds, index).masked_fill(~valid[..., None], 0.0)
        positions = kwargs["position_ids"]
        kwargs["position_ids"] = plan.gather_positions(positions.to(valid.device), index)
        seq = read.seq.gather(index, valid)
        seq.index = torch.arange(index.shape[1], device=valid.device)[None].expand(index.shape[0], -1)
        if self.family.gather_decoder_inputs is not None:
            self.family.gather_decoder_inputs(kwargs, index)
        return index, seq

    def _renumber(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Positions as if the prompt had been built without the removed slots, for families that
        number that way; else the survivors keep theirs (only the text axis that serves masks moves)."""
        shift = shift.to(positions.dtype)
        if self.family.renumber_positions:
            return positions - shift
        if _text_positions(positions) is not None and positions.dim() == 3:
            return torch.cat([positions[:1] - shift, positions[1:]])
        return positions

    def _prepare_masks(self, module, kwargs: dict, chunk: Chunk) -> None:
        """The mapping of masks per layer type, for models that prepare them for the decoder."""
        hidden = kwargs["inputs_embeds"]
        types = list(getattr(module.config, "layer_types", None) or ["full_attention"])
        kwargs["attention_mask"] = {
            t: attention_mask(chunk, 0, t, hidden, types.index(t), module.config) for t in dict.fromkeys(types)
        }


def _input_blocks(blocks, past: int, q: int, index: torch.Tensor, valid: torch.Tensor):
    """``(B, T)`` blocks over the stock sequence from its start -> those of the decoder-input tokens."""
    if blocks is None:
        return None
    blocks = blocks.to(index.device)
    blocks = torch.nn.functional.pad(blocks, (0, max(0, past + q - blocks.shape[1])), value=-1)
    return blocks[:, past : past + q].gather(1, index).masked_fill(~valid, -1)


def _text_positions(positions: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(B, L)`` text positions: the ids themselves, or the leading axis of transformers'
    4-axis M-RoPE ids (text, t, h, w), which serves the masks; ``None`` for other layouts."""
    if positions is None:
        return None
    if positions.dim() == 2:
        return positions
    return positions[0] if positions.shape[0] == 4 else None


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
        fed = chunk.fed
        if chunk.session is not None:
            seqs, seq = [], chunk.group_seq[0]
            for g in range(len(chunk.groups)):
                seq = chunk.group_seq.get(g, seq)
                seqs.append(seq)
            chunk.session.append(fed.count, fed.index, fed.removed, seqs)
        if fed.removed.any() or chunk.before:
            rows = plan.output_rows(fed.index.to(output.last_hidden_state.device), chunk.seq, fed.count)
            output.last_hidden_state = gather_seq(output.last_hidden_state, rows)
        return output


class Score(Hook):
    """Pre-hook on the attention of layer ``k-1``: the attention the last token of every sequence
    pays to every token (one query row per sequence), for the merge before layer ``k``."""

    def __init__(self, state: IllavaState, family: DecoderFamily, k: int, window: int | None = None):
        super().__init__(state)
        self.family = family
        self.k = k
        self.window = window  # layer k-1 attends over a sliding window (in stock positions)

    def __call__(self, module, args, kwargs):
        chunk = self.state.chunk()
        if chunk is None or self.k not in chunk.reduce_at or self.k in chunk.scores:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        seq = chunk.seq
        rows = seq.query_rows()
        stock = chunk.fed.origin.gather(1, seq.index).to(hidden.device) if self.window is not None else None
        with torch.no_grad():  # a selection signal: no gradient flows through which tokens are kept
            if self.state.policy.llm_query == "all":  # every query scores (FastV)
                every = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
                query, key, scale = self.family.query_key(module, hidden, kwargs["position_embeddings"], every)
                received = received_from_all(query, key, scale, seq.mask, seq.segments)
                chunk.scores[self.k] = received[:, None].expand(-1, rows.shape[1], -1)
            else:
                query, key, scale = self.family.query_key(module, hidden, kwargs["position_embeddings"], rows)
                chunk.scores[self.k] = query_scores(query, key, scale, seq.key_mask(rows, stock, self.window))
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
        chunk.group_seq.setdefault(g, chunk.seq)
        kwargs.update(layer_kwargs(chunk, g, self.layer_type, hidden, self.i, self.config))
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
    commit = k not in chunk.before
    seq = chunk.before.get(k, chunk.seq)
    scores = chunk.scores.get(k)
    if scores is None:
        raise RuntimeError(f"illava: no scores for LLM merge layer {k}: the scoring hook of layer {k - 1} did not run")
    scores = scores.to(hidden.device)
    token_scores = state.policy.scores("llm", scores.gather(1, seq.segments.clamp(min=0)[:, None]).squeeze(1))
    tracing = commit and chunk.trace is not None
    merged = plan.merge_spans(
        hidden, token_scores, seq, state.config.keep_ratio_at(k), state.policy, state.config, tracing
    )
    new_index, new_mask = plan.compact(merged.keep, chunk.fed.pad_left)
    out = gather_seq(merged.hidden, new_index)
    if commit:
        chunk.before[k] = seq
        chunk.seq = seq.gather(new_index, new_mask)
        chunk.group_seq[g] = chunk.seq
        scope = state.current()
        if scope is not None:
            scope.stats.llm.append(LLMLayerStats(k, merged.visual_in, merged.visual_out, hidden.shape[1], out.shape[1]))
        if tracing:
            previous = chunk.trace[-1][1]
            origin = chunk.fed.index.gather(1, chunk.seq.index).masked_fill(~chunk.seq.mask, -1)
            chunk.trace.append((k, plan.follow(previous, merged.step, new_index, new_mask), origin))
    return out


def merged_sequence(state: IllavaState) -> Sequence | None:
    """The current sequence of the decoder call in progress on this thread once an LLM merge ran in
    it (``index``: decoder-input index of every token; ``mask``: real tokens), else ``None``."""
    chunk = state.chunk()
    return chunk.seq if chunk is not None and chunk.before else None


# ------------------------------------------------------------------------------------ helpers
def _cache_key(kwargs: dict) -> str:
    return "past_key_values" if "past_key_values" in kwargs and "cache" not in kwargs else "cache"


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _refuse_reduced_cache(kwargs: dict) -> None:
    cache = _cache_of(kwargs)
    if isinstance(cache, IllavaDynamicCache) and cache.illava is not None:
        raise ValueError(
            "illava: a cache that illava reduced cannot be continued inside torch.compile; decode it eagerly"
        )


def _wants_cache(kwargs: dict, config) -> bool:
    use_cache = kwargs.get("use_cache")
    return bool(config.use_cache if use_cache is None else use_cache)


def _item_stats(state, scope, items: list[tuple[str, int, int]], lost: list[int], q: int) -> None:
    stats = scope.stats
    stats.sequence_in = stats.sequence_after_encoder = q
    stats.encoder, stats.items, crops = [], [], {}
    calls = {kind: call_of(state, scope.encoder_outputs.get(kind)) for kind in ("image", "video")}
    for kind, call in calls.items():
        if call is not None:
            stats.encoder.append(call.as_stats())
        crops[kind] = list(call.item_crops) if call is not None else []
    counts = {kind: sum(1 for item in items if item[0] == kind) for kind in crops}
    # tokens per crop, when every crop of the call yields the same number (tiles that the encoder
    # cannot group into images: an image's crops are then its tokens / tokens per crop)
    per_crop = {}
    for kind, call in calls.items():
        total = sum(n for k, _, n in items if k == kind)
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


def _encoder_calls(state, scope) -> dict:
    """The encoder call whose features filled the placeholders of every kind of the call in progress."""
    calls = {kind: call_of(state, scope.encoder_outputs.get(kind)) for kind in ("image", "video")}
    return {kind: call for kind, call in calls.items() if call is not None}


def _start_trace(state, scope, chunk: Chunk) -> None:
    """``illava.tools.viz``: the decoder-input token of every fed position (-1: removed slot)."""
    fed, seq = chunk.fed, chunk.seq
    tokens = plan.inverse_index(fed.index, seq.mask, fed.count).masked_fill(fed.removed, -1)
    chunk.trace = [(0, tokens, fed.index.masked_fill(~seq.mask, -1))]
    scope.stats.trace = ForwardTrace(
        calls=_encoder_calls(state, scope),
        placeholders={kind: mask.cpu() for kind, mask in scope.placeholders.items()},
        llm=chunk.trace,
    )
