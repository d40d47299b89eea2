"""FLOP and byte counts: the 2·params·tokens rule, a hand count, and what each knob changes."""

import pytest
from transformers import LlamaConfig

from workbench.errors import WorkbenchError
from workbench.roofline import Bits, Workload, analyze, count_ops, footprint, model_shape
from workbench.roofline.ops import _pairs

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                   max_position_embeddings=128, tie_word_embeddings=False)


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2", "qwen2-0.5b", "mistral-7b-v0.1"])
def test_flops_follow_two_params_tokens(name):
    """Forward FLOPs ~ 2 x (non-embedding params + LM head) x tokens when attention is small."""
    shape = model_shape(name)
    tokens = 16
    a = analyze(shape, "h200", phase="prefill", context=tokens, logits="all")
    # the LM head is a matrix multiply too, tied or not (tied: it reuses the embedding table)
    rule = 2 * (shape.non_embedding_params + shape.lm_head.params) * tokens
    assert a.flops == pytest.approx(rule, rel=0.01)


def test_hand_count_of_a_tiny_llama_decode_step():
    """Every op of one decode step of a 2-layer GQA Llama, counted by hand."""
    shape = model_shape(TINY)
    ctx, h, kvh, d, hid, inter, vocab = 10, 4, 2, 16, 64, 160, 100
    ops = {o.name: o for o in count_ops(shape, Workload("decode", 1, ctx), Bits(16, 16, 16))}
    lin = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 160), "mlp.up_proj": (64, 160),
           "mlp.down_proj": (160, 64)}
    for name, (i, o) in lin.items():
        assert ops[name].flops == 2 * i * o
        assert ops[name].weight_bytes == 2 * i * o          # 16-bit weights
        assert ops[name].act_bytes == 2 * (i + o)           # one token in, one out
        assert ops[name].count == 2
    keys = ctx + 1
    att = ops["attention (fused)"]
    assert att.flops == h * keys * (4 * d + 5)              # QK 2d, PV 2d, softmax 5 per score
    assert att.kv_bytes == 2 * keys * kvh * d * 2           # K and V once per KV head
    assert att.act_bytes == 2 * (h * d) * 2                 # q in, output out
    assert ops["KV cache write"].kv_bytes == 2 * kvh * d * 2
    assert ops["LM head"].flops == 2 * hid * vocab
    assert ops["act(gate)·up"].flops == 5 * inter
    assert ops["input_layernorm"].flops == 4 * hid
    total = sum(o.flops * o.count for o in ops.values())
    assert total == analyze(shape, "h200", phase="decode", context=ctx).flops


def test_causal_pairs_and_windows():
    assert _pairs(4, 0, None, True) == (16, 10)             # 4x4 rectangle, 1+2+3+4 needed
    assert _pairs(1, 9, None, True) == (10, 10)             # decode sees every cached key
    assert _pairs(3, 0, None, False) == (9, 9)              # encoder: both directions
    assert _pairs(1, 100, 8, True)[1] == 8                  # sliding window caps keys
    assert _pairs(6, 0, 4, True)[1] == 1 + 2 + 3 + 4 + 4 + 4


def test_flash_removes_score_traffic_and_masked_work():
    flash = analyze("llama-2-7b", "h200", phase="prefill", context=2048, flash=True)
    plain = analyze("llama-2-7b", "h200", phase="prefill", context=2048, flash=False)
    assert plain.bytes_of("activations") > 2 * flash.bytes_of("activations")
    assert plain.flops > flash.flops
    assert plain.time > flash.time
    pessimistic = analyze("llama-2-7b", "h200", phase="prefill", context=2048, block_q=128)
    assert pessimistic.bytes_of("kv") > 4 * flash.bytes_of("kv")


def test_decode_is_memory_bound_everywhere_and_prefill_is_not():
    from workbench.roofline import catalog

    shape = model_shape("llama-2-7b")
    for chip in catalog():
        a = analyze(shape, chip, phase="decode", context=1024)
        assert a.intensity < 2 and a.bound == "memory", chip.key
    assert analyze(shape, "h200", phase="prefill", context=2048).bound == "compute"


def test_gqa_kv_bits_and_weight_bits_change_the_right_bytes():
    mha = analyze("llama-2-7b", "h200", context=8192)
    gqa = analyze(model_shape("llama-2-7b", num_key_value_heads=8), "h200", context=8192)
    assert gqa.bytes_of("kv") == pytest.approx(mha.bytes_of("kv") / 4)
    assert gqa.memory.kv_cache == pytest.approx(mha.memory.kv_cache / 4)
    kv4 = analyze("llama-2-7b", "h200", context=8192, kv_bits=4)
    assert kv4.bytes_of("kv") == pytest.approx(mha.bytes_of("kv") / 4)
    w4 = analyze("llama-2-7b", "h200", context=8192, w_bits=4)
    assert w4.bytes_of("weights") == pytest.approx(mha.bytes_of("weights") / 4)
    assert w4.time < mha.time and kv4.time < mha.time


def test_batching_raises_intensity_and_throughput():
    one = analyze("llama-2-7b", "h200", batch=1, context=1024)
    many = analyze("llama-2-7b", "h200", batch=32, context=1024)
    assert many.intensity > 10 * one.intensity
    assert many.tokens_per_s > 10 * one.tokens_per_s


def test_sliding_window_caps_kv_reads_and_cache():
    a = analyze("mistral-7b-v0.1", "h200", context=8192)
    b = analyze("mistral-7b-v0.1", "h200", context=16384)
    assert a.bytes_of("kv") == pytest.approx(b.bytes_of("kv"), rel=1e-3)
    assert a.memory.kv_cache == b.memory.kv_cache


def test_what_fits_is_consistent_with_the_footprint():
    a = analyze("llama-2-7b", "h200", context=4096)
    cap = a.chip.memory * a.memory_fraction
    wl = Workload("decode", a.max_batch, 4096)
    assert footprint(a.shape, wl, a.bits).total <= cap
    wl = Workload("decode", a.max_batch + 1, 4096)
    assert footprint(a.shape, wl, a.bits).total > cap
    assert analyze("llama-2-70b", "l4", context=1024).max_batch == 0    # 140 GB > 24 GB


def test_encoder_phases_and_errors():
    bert = analyze("bert-base", "h200", context=512)
    assert bert.workload.phase == "encode" and bert.memory.kv_cache == 0
    assert bert.intensity > 50
    with pytest.raises(WorkbenchError, match="encoder"):
        analyze("bert-base", "h200", phase="decode")
    with pytest.raises(WorkbenchError, match="decoder"):
        analyze("gpt2", "h200", phase="encode")
    with pytest.raises(WorkbenchError, match="phase"):
        analyze("gpt2", "h200", phase="generate")
    with pytest.raises(WorkbenchError, match="bit width"):
        analyze("gpt2", "h200", kv_bits=0)
    with pytest.raises(WorkbenchError, match="batch"):
        analyze("gpt2", "h200", batch=0)
