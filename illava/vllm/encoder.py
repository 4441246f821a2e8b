"""The encoder stage inside vLLM's vision towers: what every family of the plugin shares.

- ``Stage``: the resolved configuration of a served model, its policy, the count of visual tokens an
  item keeps (what the processor reserves placeholders for, before the model runs) and the feature
  stage (DivPrune / random);
- ``vit_merge_forward``: a pre-norm ViT layer of vLLM (CLIP's ``CLIPEncoderLayer``: ``layer_norm1``,
  ``self_attn.qkv_proj`` / ``out_proj``, ``layer_norm2``, ``mlp``) with the encoder stage: the
  layer's own q and k give the attention every token receives (``illava.plan.encoder.attend_and_score``),
  units of blocks are put in block order at the first merge (``to_block_order``),
  ``illava.plan.encoder.merge_units`` decides, the MLP runs on the survivors. The kernels are the
  ones the transformers backend's ``IllavaViTLayer`` (``illava.hf.encoder``) runs, on vLLM's modules;
- ``across_heads``: under tensor parallelism each rank holds some of the heads; the scores and keys
  (means over heads) are combined across the ranks before the decision, identically on every rank.
"""

from __future__ import annotations

import torch

from ..config import IllavaConfig, keep_count
from ..plan import encoder as plan
from ..policy import Policy, policy_of


def across_heads(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """A statistic every rank measured over its own heads of a vision attention (the attention every
    token receives, the keys; a mean over heads), made the mean over all the heads under tensor
    parallelism: the ranks' means are gathered (vLLM's tensor-parallel group; ``tokens x crops`` numbers
    per rank for the scores) and averaged in rank order, so every rank holds the same bytes and makes
    the same merge decision. ``tp_size``: the attention's (1: every head is here, as one rank, or
    Qwen-VL's ``--mm-encoder-tp-mode data``), then ``x`` as it is."""
    if tp_size == 1:
        return x
    from vllm.distributed import get_tp_group

    return get_tp_group().all_gather(x[None].contiguous(), dim=0).mean(0)


class Stage:
    """The encoder (and feature) stage of one served model; ``trace``: the ``CropTrace`` of the vision
    call in progress (vLLM runs one at a time per worker)."""

    def __init__(self, config: IllavaConfig, unit: int = 1, keep_first: int = 0):
        self.config = config
        self.policy: Policy = policy_of(config)
        self.unit, self.keep_first = unit, keep_first
        self.trace: plan.CropTrace | None = None

    def units_after(self, units: int, grid: tuple[int, int] | None = None) -> int:
        """Units of a crop of ``units`` units left after the encoder stage."""
        return plan.units_after(self.config, self.policy, units, self.unit, grid)

    def features_after(self, rows: int) -> int:
        """Feature rows of an item left after the feature stage (``feature_keep``), of ``rows``."""
        return keep_count(rows, self.config.feature_keep) if self.config.features_active else rows

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """The feature stage on one item's projected tokens ``(N, D)``: the rows the policy's
        ``select`` keeps, in their order (as ``illava.hf.encoder.select_features``); indices."""
        n = features.shape[0]
        m = self.features_after(n)
        if m >= n:
            return torch.arange(n, device=features.device)
        return self.policy.select(features, m).to(features.device).sort().values

    def merge(self, layer: int, hidden: torch.Tensor, received: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        hidden, self.trace = plan.merge_units(
            self.config, self.policy, layer, hidden, received, self.unit, self.keep_first, keys, self.trace
        )
        return hidden

    def bias(self, n: int) -> torch.Tensor | None:
        """ToMe's ``log(size)`` attention bias for the tokens of the call in progress."""
        if not self.policy.proportional_attention or self.trace is None:
            return None
        return plan.size_bias(self.trace.sizes, n, self.unit, self.keep_first)


def vit_merge_forward(layer, stage: Stage, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """vLLM's ``CLIPEncoderLayer.forward`` with the encoder stage at encoder layer ``index``:
    ``hidden_states`` ``(crops, tokens, D)``."""
    attn = layer.self_attn
    b, n, _ = hidden_states.shape
    x = layer.layer_norm1(hidden_states)
    qkv, _ = attn.qkv_proj(x)
    q, k, v = (t.reshape(b, n, -1, attn.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    bias = stage.bias(n)
    cls, scores = plan.scores_by_cls(stage.policy, stage.keep_first), stage.policy.uses_encoder_scores
    out, received = plan.attend_and_score(q, k, v, attn.scale, bias, cls, scores)
    out, _ = attn.out_proj(out.reshape(b, n, -1))  # row-parallel: the heads' outputs summed over ranks
    tp = getattr(attn, "tp_size", 1)
    hidden, received, keys = hidden_states + out, across_heads(received, tp), across_heads(k.mean(1), tp)
    if index == min(stage.config.encoder_layers):  # every patch still there, in raster order
        hidden, received, keys = plan.to_block_order(hidden, received, keys, stage.unit, stage.keep_first)
    hidden = stage.merge(index, hidden, received, keys)
    return hidden + layer.mlp(layer.layer_norm2(hidden))
