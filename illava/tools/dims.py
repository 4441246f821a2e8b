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
