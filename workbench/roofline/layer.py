"""A plain-PyTorch Llama decoder block with a static KV cache: the thing the GPU benchmark times.

It computes exactly what transformers' `LlamaDecoderLayer` computes (a test checks this on the
CPU) with the fused layout fast inference engines use: one QKV matrix and one gate/up matrix,
`F.rms_norm`, SDPA with `enable_gqa`, and a preallocated cache written in place, so a decode
step has static shapes and can be captured in a CUDA graph.

    block = LlamaBlock.random(hidden=4096, heads=32, kv_heads=32, head_dim=128,
                              intermediate=11008, device="cuda", dtype=torch.bfloat16)
    k, v = block.empty_cache(batch=1, max_tokens=4097)      # (batch, kv_heads, tokens, head_dim)
    y = block(x, k, v, start=4096)                           # x: (batch, new, hidden)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(positions: int, head_dim: int, theta: float, device, dtype):
    """cos, sin of shape (positions, head_dim) in the rotate-half layout transformers uses."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaBlock(nn.Module):
    """One Llama block: x + attn(rmsnorm(x)), then h + mlp(rmsnorm(h)). Weights (out, in)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                 eps: float = 1e-5, rope_theta: float = 10000.0, max_positions: int = 4096,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.intermediate = intermediate
        self.qkv = nn.Parameter(torch.empty((heads + 2 * kv_heads) * head_dim, hidden, **kw))
        self.o = nn.Parameter(torch.empty(hidden, heads * head_dim, **kw))
        self.gate_up = nn.Parameter(torch.empty(2 * intermediate, hidden, **kw))
        self.down = nn.Parameter(torch.empty(hidden, intermediate, **kw))
        self.norm1 = nn.Parameter(torch.ones(hidden, **kw))
        self.norm2 = nn.Parameter(torch.ones(hidden, **kw))
        cos, sin = rope_tables(max_positions, head_dim, rope_theta, device, dtype)
        self.register_buffer("cos", cos, persistent=False)  # (positions, head_dim)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def random(cls, *, std: float = 0.02, seed: int = 0, **kw) -> LlamaBlock:
        """A block with N(0, std) weights and unit norm weights (for speed tests only)."""
        block = cls(**kw)
        gen = torch.Generator(device=block.qkv.device).manual_seed(seed)
        with torch.no_grad():
            for p in (block.qkv, block.o, block.gate_up, block.down):
                p.normal_(0.0, std, generator=gen)
        return block

    @classmethod
    def from_hf(cls, layer, config, max_positions: int = 4096) -> LlamaBlock:
        """Copy the weights of a transformers LlamaDecoderLayer into a fused block."""
        a, m = layer.self_attn, layer.mlp
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
        w = a.q_proj.weight
        block = cls(config.hidden_size, heads, kv, head_dim, config.intermediate_size,
                    config.rms_norm_eps, theta, max_positions, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            block.qkv.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            block.o.copy_(a.o_proj.weight)
            block.gate_up.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            block.down.copy_(m.down_proj.weight)
            block.norm1.copy_(layer.input_layernorm.weight)
            block.norm2.copy_(layer.post_attention_layernorm.weight)
        return block

    def empty_cache(self, batch: int, max_tokens: int, fill: str = "randn"):
        """K and V caches, each (batch, kv_heads, max_tokens, head_dim); random unless fill='zeros'."""
        shape = (batch, self.kv_heads, max_tokens, self.head_dim)
        make = torch.randn if fill == "randn" else torch.zeros
        return (make(shape, device=self.qkv.device, dtype=self.qkv.dtype),
                make(shape, device=self.qkv.device, dtype=self.qkv.dtype))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                start: int) -> torch.Tensor:
        """x (batch, new, hidden) at positions start..start+new-1 -> (batch, new, hidden).

        Writes the new keys/values into the caches at those positions and attends to all
        positions < start + new (causally among the new ones).
        """
        b, t, _ = x.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        hn = F.rms_norm(x, (x.shape[-1],), self.norm1, self.eps)
        qkv = F.linear(hn, self.qkv)                                  # (b, t, (h + 2kvh) d)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)                        # (b, h, t, d)
        k = k.view(b, t, kvh, d).transpose(1, 2)                      # (b, kvh, t, d)
        v = v.view(b, t, kvh, d).transpose(1, 2)
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]   # (t, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache[:, :, start:start + t] = k
        v_cache[:, :, start:start + t] = v
        keys, values = k_cache[:, :, :start + t], v_cache[:, :, :start + t]
        if t == 1 or start == 0:
            attn = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1,
                                                  enable_gqa=kvh != h)
        else:  # chunk after a prefix: explicit mask (query i sees keys <= start + i)
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                  enable_gqa=kvh != h)
        x = x + F.linear(attn.transpose(1, 2).reshape(b, t, h * d), self.o)
        hn = F.rms_norm(x, (x.shape[-1],), self.norm2, self.eps)
        gate, up = F.linear(hn, self.gate_up).split(self.intermediate, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)
