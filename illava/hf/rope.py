"""Post-RoPE queries and keys of a Llama-style decoder attention module: the LLM stage's scoring
inputs (``illava.hf.llm.DecoderFamily.query_key``'s default)."""

from __future__ import annotations

import torch

from ..plan.llm import gather_seq


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
