"""Every Triton kernel compiles for an H200 (sm_90), checked on a machine without a GPU.

The other kernel tests run the kernels in Triton's interpreter, which never builds their IR: a
kernel can pass all of them and still fail to compile on a GPU (a loop-carried variable that
changes type did, in the squeezed lookup's max vote). Here the ops run once under the
interpreter with the GPU's dtype (bf16) and the launch options the benchmarks time, their
launches are recorded, and each is compiled for sm_90 (`kernels.compile_check`), with the
constexprs a GPU picks where the interpreter picks otherwise.
"""

import pytest
import torch

from benchmarks.bench_squeezed import DECODE_VARIANTS
from kernels.compile_check import compile_launches, record_launches
from kernels.dispatch import HAS_TRITON, is_interpreted
from kernels.kvquant_decode import _kvq_decode_kernel, kvquant_decode_triton
from kernels.kvquant_pack import quantize_pack
from kernels.lse_merge import merge_attention_partials
from kernels.squeezed_attention import _prefetch_meta
from kernels.window_decode import window_attention
from tests.test_squeezed_fastpath import synthetic_index
from workbench.kvquant.fused import random_layer, reblock
from workbench.kvquant.levels import nf_levels
from workbench.squeezed.fastpath import DevicePlan, fast_squeezed_attention

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and is_interpreted(_kvq_decode_kernel)),
    reason="records launches under Triton's interpreter (TRITON_INTERPRET=1, no GPU)")

BF16 = torch.bfloat16


def run_squeezed_ops() -> None:
    """The squeezed fast path as the benchmarks run it: decode (fused and separate selection,
    each timed launch variant), prefill (kernels and rows), one-level and hierarchical, both
    votes, the 'layer' allocation."""
    index, keys = synthetic_index(d=64)
    gen = torch.Generator().manual_seed(0)
    n, kv, d = index.context_len, index.kv_heads, index.head_dim
    k = torch.cat([keys, torch.randn(kv, 14, d, generator=gen)], 1)[None].to(BF16)
    v = torch.randn(1, kv, n + 14, d, generator=gen).to(BF16)
    for hierarchical in (False, True):
        for vote in ("mean", "max"):
            for block in (16, 4, None):
                plan = DevicePlan.from_index(index, 0.3, hierarchical=hierarchical,
                                             block_size=block, device="cpu", dtype=BF16,
                                             vote=vote)
                for q_len, modes in ((1, (True, False)), (11, (None, "rows"))):
                    q = torch.randn(1, index.q_heads, q_len, d, generator=gen).to(BF16)
                    for mode in modes:
                        fast_squeezed_attention(
                            plan, 0, q, k, v, block, backend="triton",
                            fused_select=None if mode == "rows" else mode,
                            prefill="rows" if mode == "rows" else None)
    plan = DevicePlan.from_index(index, 0.3, block_size=16, device="cpu", dtype=BF16)
    q = torch.randn(1, index.q_heads, 1, d, generator=gen).to(BF16)
    for _, tuning in DECODE_VARIANTS:
        fast_squeezed_attention(plan, 0, q, k, v, 16, backend="triton", tuning=tuning)
    layer = DevicePlan.from_index(index, 0.3, block_size=16, device="cpu", dtype=BF16,
                                   allocation="layer")
    fast_squeezed_attention(layer, 0, q, k, v, 16, backend="triton")


def run_kvquant_ops() -> None:
    """The KVQuant decode kernel at 2, 3 and 4 bits with every launch option the benchmark
    times (bf16 queries: the fp16 math and the PTX level lookup), its append kernel, the
    recent window's partial and the LSE merge."""
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4):
        packed = random_layer(1, 2, 70, 64, bits, 0.02, 1, generator=gen)
        q = torch.randn(1, 4, 64, generator=gen).to(BF16)
        kvquant_decode_triton(q, packed)
    packed = random_layer(1, 2, 70, 64, 3, 0.02, 1, generator=gen)
    for p in (packed, reblock(packed, 32)):
        for group in (1, 2):
            q = torch.randn(1, 2 * group, 64, generator=gen).to(BF16)
            for opts in ({"key_sparse": "segments", "value_sparse": "segments"},
                         {"rotate_queries": "prepass"},
                         *([{"score_math": "fma"}, {"score_math": "fma",
                                                    "rotate_queries": "prepass"}]
                           if group == 1 else [])):
                kvquant_decode_triton(q, p, **opts)
            kvquant_decode_triton(q.float(), p)
    x = torch.randn(9, 64, generator=gen)
    for bits in (2, 3, 4):
        lv = nf_levels(bits)
        quantize_pack(x, lv, lv, bits, cut_lo=x.min(1).values, cut_hi=x.max(1).values,
                      rows_per_head=3, n_sink=1, backend="triton")
        lo = torch.randn(3, 64, generator=gen) - 1
        quantize_pack(x, lv, lv, bits, lo=lo, hi=lo + 2, heads=3, rows_per_head=3, pos0=0,
                      n_sink=1, backend="triton")
        quantize_pack(x, lv, lv, bits, lo=lo, hi=lo + 2, heads=3, rows_per_head=3, pos0=0,
                      n_sink=1, feedback=torch.eye(64).expand(3, 64, 64), backend="triton")
    merge_attention_partials(torch.randn(2, 4, 3, 64).to(BF16), torch.randn(2, 4, 3),
                             backend="triton")
    kw = torch.randn(1, 2, 37, 64, generator=gen).to(BF16)
    window_attention(torch.randn(1, 6, 64, generator=gen).to(BF16), kw, kw, 0.125,
                     backend="triton")


def gpu_only_options() -> dict[str, list[dict]]:
    """Launch constexprs that only a GPU run sets (the L2 prefetch variants of the sparse
    attention: inline PTX, off under the interpreter)."""
    k = torch.empty(1, 1, 1, 128, dtype=BF16)
    sets = [_prefetch_meta(t, k, interpreted=False) for _, t in DECODE_VARIANTS]
    return {"_sparse_attention_kernel": [s for s in sets if s]}


@pytest.mark.parametrize("ops", [run_squeezed_ops, run_kvquant_ops], ids=["squeezed", "kvquant"])
def test_kernels_compile_for_sm90(ops):
    with torch.no_grad(), record_launches() as launches:
        ops()
    names = {x.name for x in launches}
    assert len(names) >= 3, names
    compiled, failures = compile_launches(launches, arch=90, extra=gpu_only_options())
    assert compiled >= len(launches)
    assert not failures, "\n".join(failures)
