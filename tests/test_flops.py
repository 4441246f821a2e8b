import pytest
import torch
from conftest import chat

import illava
from illava.tools.flops import LayerDims, encoder_macs, layer_macs, llm_macs, prefill_flops


def test_layer_macs_hand_computed():
    dims = LayerDims(d=8, m=16, heads=2, kv_heads=1, gated=True)
    # q,o: 2*10*8*8 = 1280; k,v: 2*10*8*4 = 640; attention 2*10*10*8 = 1600; MLP 3*10*8*16 = 3840
    assert layer_macs(10, 10, dims) == 1280 + 640 + 1600 + 3840


def test_encoder_macs_with_a_merge_hand_computed():
    dims = LayerDims(d=8, m=16, heads=2, kv_heads=2, gated=False)
    # 2 crops of 10 tokens; layer 1 merges 20 -> 12 (attention on 20, MLP on 12); layer 2 runs 12
    layer0 = 2 * 20 * 64 + 2 * 20 * 64 + 2 * 20 * 10 * 8 + 2 * 20 * 8 * 16
    layer1 = 2 * 20 * 64 + 2 * 20 * 64 + 2 * 20 * 10 * 8 + 2 * 12 * 8 * 16
    layer2 = 2 * 12 * 64 + 2 * 12 * 64 + 2 * 12 * 6 * 8 + 2 * 12 * 8 * 16
    assert encoder_macs(3, 20, 2, [(1, 20, 12)], dims) == layer0 + layer1 + layer2


def test_llm_macs_switches_length_at_merge_layer():
    dims = LayerDims(d=4, m=8, heads=2, kv_heads=1, gated=True)
    assert llm_macs(3, 10, [(2, 6)], dims, batch=2) == 2 * (2 * layer_macs(10, 10, dims) + layer_macs(6, 6, dims))


def test_prefill_flops_baseline_vs_illava(model, build, photos):
    inputs = build([chat("<image>\nwhat is this?")], [photos["cat"]])
    sequence = inputs["input_ids"].shape[1]
    illava.apply(model, illava.IllavaConfig())  # enabled, no stage: stock compute, stock counts
    with torch.inference_mode():
        model(**inputs)
    base = prefill_flops(model, illava.stats(model), sequence)
    illava.apply(model, "image")
    with torch.inference_mode():
        model(**inputs)
    ours = prefill_flops(model, illava.stats(model), sequence)
    assert ours["encoder"] < base["encoder"] and ours["llm"] < base["llm"] and ours["projector"] < base["projector"]
    assert base["lm_head"] == ours["lm_head"]
    assert base["total"] == pytest.approx(sum(v for k, v in base.items() if k != "total"))
    # the stock LLM count is exactly the formula on the stock sequence
    tc = model.config.text_config
    dims = LayerDims(tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, True)
    assert base["llm"] == pytest.approx(2 * llm_macs(tc.num_hidden_layers, sequence, [], dims) / 1e9)
