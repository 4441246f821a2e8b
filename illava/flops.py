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
projector (LLaVA) / patch merger (Qwen), and the LM head on the last token. Not counted: norms,
rotary embeddings, softmax, the scoring row of the LLM stage (one query, ``L*d`` MACs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerDims:
    d: int
    m: int
    heads: int
    kv_heads: int
    gated: bool


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
    Returns ``encoder``, ``projector``, ``llm``, ``lm_head`` and ``total``.
    """
    config = model.config
    family = config.model_type
    vc, tc = config.vision_config, config.text_config
    encoder = 0.0
    for call in stats.encoder:
        if family == "llava_onevision":
            dims = LayerDims(
                vc.hidden_size, vc.intermediate_size, vc.num_attention_heads, vc.num_attention_heads, False
            )
            encoder += encoder_macs(vc.num_hidden_layers, call["tokens"], call["crops"], call["layers"], dims)
            continue
        qwen2 = family == "qwen2_vl"
        width = vc.embed_dim if qwen2 else vc.hidden_size
        mlp = int(vc.embed_dim * vc.mlp_ratio) if qwen2 else vc.intermediate_size
        dims = LayerDims(width, mlp, vc.num_heads, vc.num_heads, not qwen2)
        window = None if qwen2 else (vc.window_size // vc.patch_size) ** 2
        full = None if qwen2 else set(vc.fullatt_block_indexes)
        encoder += encoder_macs(vc.depth, call["tokens"], call["crops"], call["layers"], dims, window, full)
    encoder_out = sum(c["layers"][-1][2] if c["layers"] else c["tokens"] for c in stats.encoder)
    if family == "llava_onevision":
        projector = encoder_out * (vc.hidden_size * tc.hidden_size + tc.hidden_size * tc.hidden_size)
    else:  # the patch merger folds each surviving 2x2 block
        unit = vc.spatial_merge_size**2
        width = vc.embed_dim if family == "qwen2_vl" else vc.hidden_size
        out = vc.hidden_size if family == "qwen2_vl" else vc.out_hidden_size
        projector = encoder_out / unit * (unit * width * unit * width + unit * width * out)
    text = LayerDims(tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, True)
    removed_at_input = sum(i.stock_tokens - i.tokens for i in stats.items) / batch
    merges = [(layer.layer, layer.sequence_out) for layer in stats.llm]
    llm = llm_macs(tc.num_hidden_layers, sequence - removed_at_input, merges, text, batch)
    lm_head = batch * tc.hidden_size * tc.vocab_size
    result = {"encoder": encoder, "projector": projector, "llm": llm, "lm_head": lm_head}
    result = {k: 2 * v / 1e9 for k, v in result.items()}
    result["total"] = sum(result.values())
    return result
