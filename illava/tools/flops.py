"""Analytic compute model of a prefill, per stage, from the token counts that actually ran.

Per transformer layer, in multiply-accumulates (MACs; FLOPs = 2 x MACs), for ``n`` query tokens
attending over ``c`` tokens, width ``d``, MLP width ``m``, ``h`` query and ``g`` key/value heads:

    attention projections  n*d*d (q) + 2*n*d*(d*g/h) (k, v) + n*d*d (o)
    attention              2*n*c*d   (q.k^T and attention x v, full square, also for causal)
    MLP                    k*n*d*m   (k = 3 for gated MLPs, 2 otherwise)

An encoder merge layer runs its attention on the tokens before the merge and its MLP on the
survivors. Vision encoders attend per crop / frame (``c`` = tokens of that crop; Qwen2.5-VL's
window blocks: ``c`` = tokens of a window, at most 256). The LLM runs the visual and text tokens
of the prefill; layers from an LLM merge layer on run the reduced sequence. Also counted: the
projector / patch merger (per token leaving the encoder, from the family's tooling), and the LM head on
the last token. Not counted: norms,
rotary embeddings, softmax, the scoring row of the LLM stage (one query, ``L*d`` MACs).
"""

from __future__ import annotations

from .families import tools_for
from .families.base import LayerDims

__all__ = ["LayerDims", "encoder_macs", "layer_macs", "llm_macs", "prefill_flops"]


def layer_macs(n: float, context: float, dims: LayerDims, mlp_tokens: float | None = None) -> float:
    """MACs of one transformer layer (module docstring); ``mlp_tokens`` defaults to ``n``."""
    d = dims.d
    d_kv = d * dims.kv_heads / dims.heads
    projections = 2 * n * d * d + 2 * n * d * d_kv
    attention = 2 * n * context * d
    mlp = (3 if dims.gated else 2) * (n if mlp_tokens is None else mlp_tokens) * d * dims.m
    return projections + attention + mlp


def encoder_macs(
    depth: int,
    tokens: int,
    crops: int,
    merges: list[tuple[int, int, int]],
    dims: LayerDims,
    window: int | None = None,
    full_layers: set[int] | None = None,
) -> float:
    """MACs of a vision encoder over ``crops`` crops of ``tokens`` tokens (totals over crops when
    ``merges`` come from a packed encoder), with merges ``(layer, tokens in, tokens out)``."""
    per_layer = {layer: (n_in, n_out) for layer, n_in, n_out in merges}
    n, total = float(tokens), 0.0
    for layer in range(depth):
        n_in, n_out = per_layer.get(layer, (n, n))
        per_crop = n_in / crops
        context = per_crop
        if window is not None and layer not in (full_layers or set()):
            context = min(per_crop, window)
        total += layer_macs(n_in, context, dims, mlp_tokens=n_out)
        n = n_out
    return total


def llm_macs(depth: int, sequence: int, merges: list[tuple[int, int]], dims: LayerDims, batch: int = 1) -> float:
    """MACs of a decoder prefill of ``sequence`` tokens per sample; ``merges`` = (layer, new length)."""
    lengths = dict(merges)
    n, total = float(sequence), 0.0
    for layer in range(depth):
        n = lengths.get(layer, n)
        total += batch * layer_macs(n, n, dims)
    return total


def prefill_flops(model, stats, sequence: int, batch: int = 1) -> dict[str, float]:
    """Analytic prefill GFLOPs per stage of ``model`` for the token counts in ``stats``.

    ``stats`` is the ``illava.Stats`` of the prefill (with illava disabled it holds stock counts);
    ``sequence`` the LLM input length per sample as the stock model sees it (padding excluded).
    The dimensions come from the family's tooling (``flops_dims``). Returns ``encoder``,
    ``projector``, ``llm``, ``lm_head`` and ``total``.
    """
    dims = tools_for(model).flops_dims(model.config)
    full = set(dims.full_layers)
    encoder = sum(
        encoder_macs(dims.encoder_depth, call["tokens"], call["crops"], call["layers"], dims.encoder, dims.window, full)
        for call in stats.encoder
    )
    encoder_out = sum(
        c["layers"][-1][2] if c["layers"] and not dims.projector_on_stock else c["tokens"] for c in stats.encoder
    )
    projector = encoder_out * dims.projector_macs_per_token
    removed_at_input = sum(i.stock_tokens - i.tokens for i in stats.items) / batch
    merges = [(layer.layer, layer.sequence_out) for layer in stats.llm]
    llm = llm_macs(dims.text_depth, sequence - removed_at_input, merges, dims.text, batch)
    lm_head = batch * dims.text.d * dims.vocab
    result = {"encoder": encoder, "projector": projector, "llm": llm, "lm_head": lm_head}
    result = {k: 2 * v / 1e9 for k, v in result.items()}
    result["total"] = sum(result.values())
    return result
