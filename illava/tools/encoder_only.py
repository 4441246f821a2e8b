"""The encoder stage on a vision tower alone, through the library's real LLaVA path.

The encoder stage runs inside a vision-language model's feature call; to study it on a vision
tower alone (e.g. the real DINOv2-S/14 of ``illava.tools.realparts``), the tower is put into a
LLaVA-1.5 model whose decoder is tiny (zeros) and never runs:

- ``llava_around(tower)``: a ``LlavaForConditionalGeneration`` whose vision tower *is* ``tower``
  (a ``Dinov2Model`` or ``Dinov2WithRegistersModel``, tested; a ``CLIPVisionModel`` is accepted by
  the LLaVA adapter but untested here), read at its last layer
  (merges allowed at every layer), for images of ``image_size`` px (the geometry the adapter and
  the presets see; a DINOv2 tower interpolates its positions, so it may have been built for
  another size);
- ``encode(model, pixel_values)``: one feature call (``get_image_features``) under whatever
  ``illava.apply`` configured: the tower's final tokens (its ``last_hidden_state``; for DINOv2 after
  the final layer norm: CLS, registers, then the survivors in source order) and, for every original
  patch, the row of the token that represents it (-1: dropped without a representative);
- ``EncoderMeter``: the meter of ``illava.tools.budget.solve`` that counts the *encoder's* FLOPs
  only (``illava.tools.flops.encoder_macs`` on the counts of the call), so that a budget is a share
  of the stock encoder's FLOPs;
- ``patch_grid_features``: every original patch takes the final feature of the token that
  represents it; a dropped patch takes that of the nearest represented patch on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import api
from ..adapters import adapter_for
from ..config import IllavaConfig
from .budget import Meter, Point
from .families import tools_for
from .flops import encoder_macs


def llava_around(tower, image_size: int | None = None, vocab_size: int = 64):
    """A LLaVA-1.5 model with ``tower`` as its vision tower (the module itself, not a copy), read at
    its last layer, with a tiny 2-layer decoder and projector of zeros that are only there for the
    model to exist (the feature call runs the projector; nothing here runs the decoder).
    ``image_size``: the images' side in pixels (default: the tower's ``image_size``)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = tower.config.to_dict()
    vision["image_size"] = image_size or tower.config.image_size
    text = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": vocab_size,
    }
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):  # the stock tower is replaced: never materialise its weights
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    device = next(tower.parameters()).device
    for part in (model.model.multi_modal_projector, model.model.language_model, model.lm_head):
        part.to_empty(device=device)
        for tensor in (*part.parameters(), *part.buffers()):
            tensor.data.zero_()  # deterministic; the decoder is not meant to run (its buffers are zeros)
    return model.eval()


@dataclass
class EncoderRun:
    tokens: torch.Tensor  # (B, N, D) the tower's last_hidden_state: head tokens, then the survivors
    owner: torch.Tensor  # (B, P) row of ``tokens`` representing each original patch, -1: dropped
    head: int  # tokens before the patches (CLS + registers)
    grid: tuple[int, int]
    call: object | None  # the EncoderCall (None: illava not applied or disabled)
    positions: torch.Tensor | None = None  # (B, K) original patch each survivor stands at (None: all, in order)

    @property
    def represented(self) -> torch.Tensor:
        """(B,) share of the original patches that have a representative."""
        return (self.owner >= 0).float().mean(1)


def encode(model, pixel_values: torch.Tensor) -> EncoderRun:
    """One feature call of ``model`` (``llava_around``) on ``pixel_values`` (module docstring)."""
    tower = model.model.vision_tower
    captured = {}

    def hook(module, args, output):
        captured["tokens"] = output.last_hidden_state

    ps = model.config.vision_config.patch_size
    grid = (pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps)
    patches = grid[0] * grid[1]
    handle = tower.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = model.model.get_image_features(pixel_values=pixel_values)
    finally:
        handle.remove()
    tokens = captured["tokens"]
    call = getattr(out, "illava_call", None)
    head = adapter_for(model).keep_first
    b = tokens.shape[0]
    trace = call.crop_trace if call is not None else None
    if trace is None:
        owner = torch.arange(patches).expand(b, patches) + head
        positions = None
    else:
        assign = trace.assign.cpu()
        owner = torch.where(assign >= 0, assign + head, -1)
        positions = trace.positions.cpu()
    return EncoderRun(tokens, owner, head, grid, call, positions)


def patch_grid_features(run: EncoderRun, rule: str = "trace") -> torch.Tensor:
    """(B, P, D) a final feature for every original patch (raster order).

    ``rule="trace"``: the token representing the patch (``owner``), or, for a dropped patch, the
    token representing the nearest represented patch. ``rule="nearest"``: the survivor standing at
    the nearest original position (its own token for a kept patch), whatever the merges traced.
    Distances are on the patch grid; ties go to the first patch in raster order."""
    if rule not in ("trace", "nearest"):
        raise ValueError(f"rule must be 'trace' or 'nearest', got {rule!r}")
    rows, cols = run.grid
    r = torch.arange(rows).repeat_interleave(cols).float()
    c = torch.arange(cols).repeat(rows).float()
    distance = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2  # (P, P)
    owner = run.owner.clone()
    if rule == "nearest" and run.positions is not None:
        owner = torch.full_like(owner, -1)
        k = run.positions.shape[1]
        owner.scatter_(1, run.positions, torch.arange(k).expand(owner.shape[0], k) + run.head)
    for i in range(owner.shape[0]):
        present = owner[i] >= 0
        if present.all():
            continue
        nearest = distance.masked_fill(~present[None], float("inf")).argmin(1)
        owner[i] = torch.where(present, owner[i], owner[i][nearest])
    return run.tokens.gather(1, owner[..., None].expand(*owner.shape, run.tokens.shape[-1]))


class EncoderMeter(Meter):
    """``illava.tools.budget.Meter`` counting the encoder's FLOPs only, on ``pixel_values`` through
    ``encode`` (no decoder forward): ``budget.solve(model, method, share, None, meter=EncoderMeter(
    model, pixel_values))`` solves a method's knob for a share of the stock encoder's FLOPs."""

    def __init__(self, model, pixel_values: torch.Tensor):
        self.model = model
        self.pixel_values = pixel_values
        self.unit = adapter_for(model).unit
        self.previous = api.config_of(model) if api.is_applied(model) else None
        self.forwards = 0
        self.dims = tools_for(model).flops_dims(model.config)
        self.stock = self.point(None, IllavaConfig())

    def point(self, knob, config: IllavaConfig) -> Point:
        try:
            api.apply(self.model, config)
            run = encode(self.model, self.pixel_values)
        except ValueError:
            return Point(knob, None)
        finally:
            self.forwards += 1
        call = run.call
        gflops = self.encoder_gflops(call)
        signature = {("encoder", layer): (n_out, call.crops * self.unit) for layer, _, n_out in call.layers}
        after = call.layers[-1][2] if call.layers else call.tokens
        return Point(knob, config, gflops, {"stock": call.tokens, "after_encoder": after}, signature)

    def encoder_gflops(self, call) -> float:
        d = self.dims
        macs = encoder_macs(
            d.encoder_depth, call.tokens, call.crops, call.layers, d.encoder, d.window, set(d.full_layers)
        )
        return 2 * macs / 1e9
