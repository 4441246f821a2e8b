"""The encoder stage's runtime, shared by the adapters (docs/method.md, "Encoder stage").

- ``encoder_call``: the context of one ``get_image_features`` / ``get_video_features`` call; the
  merge layers and the layout of survivors of that call meet in its ``EncoderCall``.
- ``merge_units``: ``illava.plan.encoder.merge_units`` for the call in progress: one merge step of a
  batch of crops (frames, tiles) and the call's ``CropTrace``.
- ``stock_count_features``: survivors written into the stock number of feature rows, the rows of
  removed tokens set to NaN. Everything downstream of the encoder (placeholder checks, the
  feature expansion of beam search and ``num_return_sequences``, feature reuse across the
  forwards of ``generate``) then runs unchanged, and the decoder input drops the NaN rows.
- layout helpers: ``pool_survivors``, ``rows_with_newlines``.
- the pieces every family's patch is made of: ``IllavaViTLayer`` (a pre-norm ViT layer with the
  encoder stage: CLIP / SigLIP, and DINOv2 as ``IllavaDinov2Layer``; the parts of a layer are
  ``ViTNames`` data, the ``unit`` / ``keep_first`` the layer got at its swap say the geometry), ``merge_layer`` (block
  order at the first merge layer, then ``merge_units``), ``FeatureCalls`` (the model mixin running
  the feature calls in encoder calls and recording the placeholders).

The decision of a merge step is ``illava.plan.encoder``'s (no transformers, no state); this module
runs it inside Hugging Face transformers' modules.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import keep_count
from ..patch import Hook, stock_when_compiled
from ..plan import encoder as plan
from ..plan.encoder import CropTrace, size_bias
from ..state import EncoderCall, IllavaState, UnitTrace


@contextmanager
def encoder_call(state: IllavaState, kind: str):
    """The ``EncoderCall`` of a feature call (``None`` while illava is disabled)."""
    if not state.config.enabled:
        yield None
        return
    with state.scope() as scope:
        call = EncoderCall(kind)
        outer, scope.encoder_call = scope.encoder_call, call
        try:
            yield call
        finally:
            scope.encoder_call = outer


def features_done(state: IllavaState, call: EncoderCall | None, output, kind: str):
    """Attach the call to its feature output (it travels with the features through ``generate``)
    and hand the output to the forward in progress, if any."""
    if call is None:
        return output
    if state.config.features_active and hasattr(output, "pooler_output"):
        output.pooler_output = select_features(state, output.pooler_output)
    if hasattr(output, "pooler_output"):
        output.illava_call = call
        first = _first_tensor(output.pooler_output)
        if first is not None:  # found again when the output was copied (accelerate moves inputs)
            state.keyed[first] = call
    scope = state.current()
    if scope is not None:
        scope.encoder_outputs[kind] = output
    return output


def select_features(state: IllavaState, features):
    """The feature stage: of every image's / video's projected tokens (an entry of a list, or a row
    of a ``(items, N, D)`` tensor) keep ``feature_keep`` of those still there, as the policy's
    ``select`` chooses; the others become NaN rows (dropped at the decoder input)."""
    ratio = state.config.feature_keep

    def one(x: torch.Tensor) -> torch.Tensor:
        present = ~x[:, 0].isnan()
        rows = present.nonzero().flatten()
        m = keep_count(rows.numel(), ratio)
        if m >= rows.numel():
            return x
        keep = torch.zeros_like(present)
        keep[rows[state.policy.select(x[rows], m).to(rows.device)]] = True
        return x.masked_fill(~keep[:, None], float("nan"))

    if isinstance(features, torch.Tensor):
        return torch.stack([one(x) for x in features]) if features.dim() == 3 else one(features)
    return type(features)(one(x) for x in features)


def call_of(state: IllavaState, output) -> EncoderCall | None:
    """The encoder call that produced a feature output (``None`` if not one of ours)."""
    call = getattr(output, "illava_call", None)
    if call is None and output is not None:
        first = _first_tensor(getattr(output, "pooler_output", None))
        call = state.keyed.get(first) if first is not None else None
    return call


def _first_tensor(features):
    if isinstance(features, torch.Tensor):
        return features
    if isinstance(features, (list, tuple)) and features and isinstance(features[0], torch.Tensor):
        return features[0]
    return None


def record_placeholders(state: IllavaState, kind: str, mask: torch.Tensor) -> None:
    """Remember where stock put the features of ``kind`` (the mask of ``get_placeholder_mask``)."""
    scope = state.current() if state.config.enabled else None
    if scope is not None:
        scope.placeholders[kind] = mask[..., 0] if mask.dim() == 3 else mask


def current_call(state: IllavaState) -> EncoderCall | None:
    """The encoder call in progress on this thread; ``None`` during a backward recomputation
    (gradient checkpointing) or when the vision tower is called on its own."""
    if torch._C._current_graph_task_id() != -1:
        return None
    scope = state.current()
    return scope.encoder_call if scope is not None else None


def recording(state: IllavaState) -> bool:
    scope = state.current()
    return scope is not None and scope.record


def collecting_attentions() -> bool:
    """Whether transformers is collecting attention maps (``output_attentions=True``)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers layouts
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def attention_and_scores(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    q,
    k,
    v,
    scale: float,
    eager_call,
    bias=None,
    cls: bool = False,
    scores: bool = True,
    collecting: bool | None = None,
):
    """Attention output and the attention each token receives.

    Normally one explicit softmax gives both (``attention_with_received_scores``; ``bias``: added
    to the logits, ``proportional_bias``). While transformers collects attention maps with eager
    attention, the stock attention module runs instead (``eager_call()``), so the map of a merge
    layer is recorded like any other layer's. ``cls``: the attention received from the first token
    (the CLS token) instead of from every query (``illava.plan.encoder.cls_received``). ``scores=False``
    (a policy that ignores them, ToMe): fused attention, the scores zeros. ``collecting``: whether
    transformers collects attention maps in this forward (``None``: ask, ``collecting_attentions``).
    """
    collecting = collecting_attentions() if collecting is None else collecting
    if collecting and attn.config._attn_implementation == "eager" and bias is None:
        out, weights = eager_call()
        received = weights[:, :, 0].float().mean(1) if cls else weights.float().mean(dim=(1, 2))
        return out, received, True
    out, received = plan.attend_and_score(q, k, v, scale, bias, cls, scores)
    return out, received, False


def needs_scores(state: IllavaState) -> bool:
    """Whether the encoder stage must measure the attention every token receives: the policy ranks by
    it, or a trace is being recorded (``illava.tools.viz``, ``illava.tools.schedule``)."""
    return getattr(state.policy, "uses_encoder_scores", True) or recording(state)


def scores_from_cls(state: IllavaState, keep_first: int) -> bool:
    """Whether the encoder stage scores by the CLS token's attention: the policy asks for it and the
    tower has one (``keep_first`` > 0)."""
    return plan.scores_by_cls(state.policy, keep_first)


@dataclass(frozen=True)
class ViTNames:
    """Where a pre-norm ViT layer keeps its parts (attribute names; ``attention`` holds ``q``, ``k``,
    ``v``, ``out`` and ``scale``): the family data of ``vit_attention_half`` / ``vit_mlp_half``.
    ``scale1`` / ``scale2``: the layer scales of the two residual branches, ``drop_path``: the
    stochastic depth of both (``None``: the family has none)."""

    norm1: str
    attention: str
    q: str
    k: str
    v: str
    out: str
    scale: str
    norm2: str
    mlp: str
    scale1: str | None = None
    scale2: str | None = None
    drop_path: str | None = None

    def branch(self, layer, which: str | None, x: torch.Tensor) -> torch.Tensor:
        """A residual branch's output ``x`` as stock adds it: layer scale, then drop path."""
        if which is not None:
            x = getattr(layer, which)(x)
        return getattr(layer, self.drop_path)(x) if self.drop_path is not None else x


# CLIP, SigLIP: ``layer_norm1``, ``self_attn`` (``q/k/v/out_proj``, ``scale``), ``layer_norm2``, ``mlp``
CLIP_VIT = ViTNames("layer_norm1", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "scale", "layer_norm2", "mlp")
# DINOv2 (with or without registers): ``norm1``, ``attention`` (``q/k/v/o_proj``, ``scaling``),
# ``layer_scale1``, ``drop_path``, ``norm2``, ``mlp``, ``layer_scale2``
DINOV2_VIT = ViTNames(
    "norm1", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "scaling", "norm2", "mlp",
    scale1="layer_scale1", scale2="layer_scale2", drop_path="drop_path",
)  # fmt: skip


def vit_attention_half(
    layer,
    state: IllavaState,
    hidden_states,
    attention_mask=None,
    unit: int = 1,
    keep_first: int = 0,
    names: ViTNames = CLIP_VIT,
    inputs: MergeInputs | None = None,
):
    """The attention half of a pre-norm ViT layer (its parts named by ``names``) that also gives
    the attention each token receives: ``(hidden after the attention residual, received scores, keys
    averaged over heads)``; the caller merges, then runs the MLP half (``vit_mlp_half``). ``unit`` /
    ``keep_first``: as ``proportional_bias``; ``inputs``: what the layer reads from its encoder call
    (``merge_inputs``; ``None``: the call in progress)."""
    inputs = inputs if inputs is not None else merge_inputs(state, {})
    if attention_mask is not None:
        raise NotImplementedError("illava: the encoder stage does not support an attention mask in the vision encoder")
    attn = getattr(layer, names.attention)
    hidden = getattr(layer, names.norm1)(hidden_states)
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    projections = (getattr(attn, names.q), getattr(attn, names.k), getattr(attn, names.v))
    q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in projections)
    bias = proportional_bias(state, hidden.shape[1], unit, keep_first, inputs.trace)
    scale, cls = getattr(attn, names.scale), scores_from_cls(state, keep_first)
    out, received, projected = attention_and_scores(
        attn, hidden, q, k, v, scale, lambda: attn(hidden), bias, cls, inputs.scores, inputs.collecting
    )
    if not projected:
        out = getattr(attn, names.out)(out.reshape(*hidden.shape[:-1], -1))
    return hidden_states + names.branch(layer, names.scale1, out), received, k.mean(1)


def vit_mlp_half(layer, hidden: torch.Tensor, names: ViTNames = CLIP_VIT) -> torch.Tensor:
    """The MLP half of a pre-norm ViT layer (its parts named by ``names``), residual included."""
    out = getattr(layer, names.mlp)(getattr(layer, names.norm2)(hidden))
    return hidden + names.branch(layer, names.scale2, out)


def proportional_bias(
    state: IllavaState, n: int, unit: int = 1, keep_first: int = 0, trace: CropTrace | None = None
) -> torch.Tensor | None:
    """``log(size)`` of every token as an additive attention bias ``(crops, 1, 1, n)`` when the
    policy asks for proportional attention (ToMe) and earlier merges made tokens of several units
    (``trace``: the call's trace before the layer, ``MergeInputs.trace``)."""
    if not state.policy.proportional_attention:
        return None
    return size_bias(trace.sizes if trace is not None else None, n, unit, keep_first)


def crop_trace(state: IllavaState) -> CropTrace | None:
    """The ``CropTrace`` of the encoder call in progress (``None`` before its first merge)."""
    call = current_call(state)
    return call.crop_trace if call is not None else None


@dataclass(frozen=True)
class GridLayout:
    """``EncoderCall.layout`` of the families whose crops are one grid each (LLaVA-1.5, InternVL,
    Gemma 3): ``crops`` of ``grid`` units (rows, cols) each, and ``head`` feature rows of a crop
    before its units (CLS, registers)."""

    crops: int
    grid: tuple[int, int]
    head: int = 0

    def trace(self, call: EncoderCall) -> CropTrace:
        """The call's trace after its last merge (the trace of no merge without an encoder stage)."""
        return call.crop_trace or CropTrace.start(self.crops, self.grid[0] * self.grid[1], torch.device("cpu"))


def unit_trace(trace: CropTrace, grids: list[tuple[int, int]], feature: torch.Tensor) -> UnitTrace:
    """One format for every family: owners over the units of the whole call."""
    return UnitTrace(grids=grids, layers=trace.call_layers(), feature=feature)


def merge_units(
    state: IllavaState,
    layer: int,
    hidden: torch.Tensor,
    received: torch.Tensor,
    unit: int = 1,
    keep_first: int = 0,
    keys: torch.Tensor | None = None,
    trace: CropTrace | None = None,
) -> torch.Tensor:
    """``illava.plan.encoder.merge_units`` at encoder ``layer``: ``trace`` (the call's ``CropTrace``
    before the layer, ``MergeInputs.trace``) goes in; in the call in progress the trace after it goes
    to ``call.crop_trace`` and the step's token counts to its statistics (not in a recomputation by
    gradient checkpointing: that call has ended, ``current_call`` is ``None``)."""
    call = current_call(state)
    out, trace = plan.merge_units(
        state.config, state.policy, layer, hidden, received, unit, keep_first, keys, trace, recording(state)
    )
    if call is not None:
        call.crop_trace = trace
        call.layers.append((layer, hidden.shape[0] * hidden.shape[1], out.shape[0] * out.shape[1]))
        cap = plan.capped(state.config, state.policy, layer, (hidden.shape[1] - keep_first) // unit, unit)
        if cap is not None:
            call.capped.append((layer, hidden.shape[0], *cap))
    return out


def merge_layer(
    state: IllavaState,
    layer: int,
    hidden: torch.Tensor,
    received: torch.Tensor,
    keys: torch.Tensor,
    trace: CropTrace | None = None,
    unit: int = 1,
    keep_first: int = 0,
):
    """The merge of a ViT layer of the family's geometry (``unit`` tokens per unit after
    ``keep_first`` kept tokens, given to the layer when it was swapped): at the first merge layer,
    units of ``k x k`` patches (``unit = k * k > 1``) are made consecutive
    (``illava.plan.encoder.to_block_order``), then ``merge_units`` (``trace``: the call's trace
    before the layer)."""
    if layer == min(state.config.encoder_layers):  # every patch is still there, in raster order
        hidden, received, keys = plan.to_block_order(hidden, received, keys, unit, keep_first)
    return merge_units(state, layer, hidden, received, unit, keep_first, keys, trace)


MERGE_INPUTS = "illava_merge_inputs"  # the keyword argument ``PassMergeInputs`` adds to a merge layer's call


@dataclass(frozen=True)
class MergeInputs:
    """What a ViT merge layer reads from its encoder call: the call's ``CropTrace`` before the layer
    (``None``: before its first merge), whether the attention every token receives is measured
    (``needs_scores``) and whether transformers collects attention maps (``collecting_attentions``)."""

    trace: CropTrace | None
    scores: bool
    collecting: bool


def merge_inputs(state: IllavaState, kwargs: dict) -> MergeInputs:
    """The ``MergeInputs`` of a merge layer's forward: taken out of its keyword arguments
    (``PassMergeInputs``), or read from the call in progress (no hook ran: inside ``torch.compile``,
    or the layer called by hand)."""
    given = kwargs.pop(MERGE_INPUTS, None)
    if given is not None:
        return given
    return MergeInputs(crop_trace(state), needs_scores(state), collecting_attentions())


class PassMergeInputs(Hook):
    """Pre-hook on a ViT merge layer: its ``MergeInputs`` as a keyword argument of its forward.

    transformers' gradient checkpointing (``GradientCheckpointingLayer``) checkpoints a layer's
    ``forward`` with the keyword arguments of the call and runs it again during backward, after the
    encoder call has ended (``current_call`` is ``None`` then, and nothing is collected). Handed
    over this way, the recomputation reads what the forward read, and makes the same merge (the
    same sizes and grid, the same attention path); the forward without checkpointing is unchanged.
    """

    def __call__(self, module, args, kwargs):
        if not self.state.config.encoder_active or current_call(self.state) is None:
            return None
        kwargs[MERGE_INPUTS] = merge_inputs(self.state, {})
        return args, kwargs


class IllavaViTLayer:
    """A pre-norm ViT layer with the encoder stage, for every family: the parts of the layer are
    the family's data (``_illava_names``: CLIP / SigLIP by default), the geometry of units the
    adapter's (``unit``, ``keep_first``).

    Modifications: the attention runs with explicit softmax (eager) to obtain the attention each
    token receives, whatever ``attn_implementation`` says; after the attention residual and before
    the MLP, ``merge_layer`` removes and recycles units. Disabled: stock forward.
    """

    _illava_names: ViTNames = CLIP_VIT
    _illava_pre_hook = PassMergeInputs  # what the layer reads from its encoder call, checkpointed with it

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = self._illava.state
        inputs = merge_inputs(state, kwargs)
        if not state.config.encoder_active:
            return super().forward(hidden_states, attention_mask, **kwargs)
        names, unit, keep_first = self._illava_names, self._illava.unit, self._illava.keep_first
        hidden, received, keys = vit_attention_half(
            self, state, hidden_states, attention_mask, unit, keep_first, names, inputs
        )
        hidden = merge_layer(state, self._illava.layer, hidden, received, keys, inputs.trace, unit, keep_first)
        return vit_mlp_half(self, hidden, names)


class IllavaDinov2Layer(IllavaViTLayer):
    """A DINOv2 layer (``Dinov2Layer``, ``Dinov2WithRegistersLayer``) with the encoder stage: the
    ViT layer of ``IllavaViTLayer`` with DINOv2's parts and its layer scales (``DINOV2_VIT``); the
    CLS token and the register tokens come first (``keep_first = 1 + registers``)."""

    _illava_names = DINOV2_VIT


class FeatureCalls:
    """Model mixin of every family: each stock ``get_<kind>_features`` runs inside an encoder call of
    that kind and its output goes through ``features_done``; ``get_placeholder_mask`` records where
    stock puts the features of every kind.

    The overrides are made for the stock class at the swap (``__init_subclass__`` of the swapped
    class), with the stock signature (``generate`` picks their arguments from it). Family
    differences are hooks: ``_illava_encode`` (the call itself, default stock) and
    ``_illava_finish`` (after ``features_done``). Disabled: stock.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("_illava_original")
        if original is None:
            return
        for kind in ("image", "video"):
            stock = getattr(original, f"get_{kind}_features", None)
            if stock is not None:  # guarded for torch.compile as the overrides in the mixin are
                name = f"get_{kind}_features"
                setattr(cls, name, stock_when_compiled(name, _feature_call(kind, stock), stock))

    def forward(self, *args, **kwargs):
        """Stock; the swap wraps it (``illava.patch``): inside ``torch.compile`` a call that removes
        tokens runs eagerly as a whole."""
        return super().forward(*args, **kwargs)

    def _illava_encode(self, kind: str, call: EncoderCall | None, stock, args: tuple, kwargs: dict):
        """The feature output of ``kind`` inside its encoder call (``stock``: the stock method)."""
        return stock(self, *args, **kwargs)

    def _illava_finish(self, kind: str, output):
        return output

    def _illava_units(self, call: EncoderCall) -> UnitTrace:
        """The source tracking of ``call``, derived after the forward from what the call holds (its
        ``crop_trace`` / ``vision_run`` and the family's ``layout``): ``illava.tools.viz``."""
        raise NotImplementedError(f"illava.viz: no source tracking for {type(self).__name__}")

    def get_placeholder_mask(self, *args, **kwargs):
        masks = super().get_placeholder_mask(*args, **kwargs)
        state = self._illava.state
        if not isinstance(masks, tuple):  # one kind: images
            record_placeholders(state, "image", masks)
            return masks
        given = dict(zip(("input_ids", "inputs_embeds", "image_features", "video_features"), args), **kwargs)
        for kind, mask in zip(("image", "video"), masks):
            if given.get(f"{kind}_features") is not None:
                record_placeholders(state, kind, mask)
        return masks


def _feature_call(kind: str, stock):
    @functools.wraps(stock)
    def get_features(self, *args, **kwargs):
        state = self._illava.state
        with encoder_call(state, kind) as call:
            out = self._illava_encode(kind, call, stock, args, kwargs)
        return self._illava_finish(kind, features_done(state, call, out, kind))

    return get_features


def stock_argument(stock, args: tuple, kwargs: dict, name: str):
    """The value of argument ``name`` of a call of ``stock`` (unbound) with ``args`` / ``kwargs``."""
    bound = inspect.signature(stock).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments[name]


def stock_count_features(survivors: torch.Tensor, slots: torch.Tensor, total: int) -> torch.Tensor:
    """``total`` feature rows: ``survivors`` at ``slots``, NaN in every other row (removed tokens)."""
    out = survivors.new_full((total, survivors.shape[-1]), float("nan"))
    out[slots] = survivors
    return out


def pool_survivors(
    features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, grid: tuple[int, int], cells: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average survivors lying in the same cell of a ``cells`` grid laid over a ``grid`` of patches.

    ``features`` ``(K, D)``, ``rows``/``cols`` ``(K,)`` patch coordinates. Returns the mean feature
    of every occupied cell in raster order with the cell's row and column, and the output token of
    every survivor; empty cells yield no token (a survivor is never invented).
    """
    cell_r = rows * cells[0] // grid[0]
    cell_c = cols * cells[1] // grid[1]
    cell = cell_r * cells[1] + cell_c
    occupied, inverse = torch.unique(cell, return_inverse=True)  # sorted = raster order
    sums = torch.zeros(occupied.numel(), features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, inverse, features.float())
    counts = torch.bincount(inverse, minlength=occupied.numel()).clamp(min=1)
    means = (sums / counts[:, None]).to(features.dtype)
    return means, occupied // cells[1], occupied % cells[1], inverse


def rows_with_newlines(
    features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, num_rows: int, newline: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in raster order with ``newline`` after every row of the grid (empty rows too), and
    the output position of every input token."""
    width = int(cols.max()) + 2 if cols.numel() else 1
    keys = torch.cat([rows * width + cols, torch.arange(num_rows, device=rows.device) * width + width - 1])
    tokens = torch.cat([features, newline.to(features)[None].expand(num_rows, -1)])
    order = torch.argsort(keys, stable=True)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel(), device=order.device)
    return tokens[order], where[: features.shape[0]]
