"""The benchmark's plain-PyTorch Llama block computes what transformers' decoder layer computes."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from workbench.roofline.layer import LlamaBlock


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return cfg, model


def test_block_matches_llama_decoder_layer(tiny):
    cfg, model = tiny
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        pre = model(ids[:, :11], output_hidden_states=True, cache=cache, use_cache=True)
        dec = model(ids[:, 11:], output_hidden_states=True, cache=cache, use_cache=True)
        block = LlamaBlock.from_hf(model.model.layers[0], cfg, max_positions=64)
        k, v = block.empty_cache(2, 12, fill="zeros")                 # (2, 2, 12, 16)
        torch.testing.assert_close(block(pre.hidden_states[0], k, v, 0), pre.hidden_states[1])
        torch.testing.assert_close(block(dec.hidden_states[0], k, v, 11), dec.hidden_states[1])
        torch.testing.assert_close(k, cache.layers[0].keys)             # post-RoPE keys
        k2, v2 = block.empty_cache(2, 12, fill="zeros")
        block(pre.hidden_states[0][:, :6], k2, v2, 0)                   # chunked prefill
        out = block(pre.hidden_states[0][:, 6:], k2, v2, 6)
        torch.testing.assert_close(out, pre.hidden_states[1][:, 6:])


def test_random_block_shapes():
    block = LlamaBlock.random(hidden=32, heads=4, kv_heads=4, head_dim=8, intermediate=48,
                              max_positions=16)
    k, v = block.empty_cache(1, 9)
    x = torch.randn(1, 1, 32)
    assert block(x, k, v, 8).shape == (1, 1, 32)
    assert block.qkv.std() > 0.01
