"""Published dimensions as plain data (no model code): what the families' tooling
(``illava.tools.families``) and the vLLM benchmark (``illava.tools.vllm_bench``, which runs with the
transformers vLLM pins) build their configurations from."""

from __future__ import annotations

OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), the LLaVA-1.5 vision tower
CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# Vicuna-7B / -13B v1.5 (Llama-2), vocabulary 32064 as in the llava-hf releases
VICUNA = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40},
}  # fmt: skip

# Qwen2.5-VL's vision tower (3B and 7B: the same 32-block windowed ViT, 1280 wide) and the 3B decoder
# (Qwen2.5-3B: 2048 wide, 36 layers); the bench's vocabulary is its own (``illava.tools.vllm_bench``)
QWEN2_5_VL_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "tokens_per_second": 2,
}  # fmt: skip
# Qwen2-VL's vision tower (675M: 32 blocks of 1280) and the 2B's decoder (Qwen2-1.5B: 1536 wide, 28 layers)
QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
QWEN2_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2}  # fmt: skip
QWEN2_5_3B = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
              "num_key_value_heads": 2}  # fmt: skip
