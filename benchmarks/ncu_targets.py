"""Launch each hot decode kernel a few times, for Nsight Compute to read its stall reasons.

    ncu --clock-control none --set full --launch-skip 2 --launch-count 1 \\
        --kernel-name regex:'_kvq_decode_kernel|_sparse_attention_kernel' \\
        --export $OUT/decode_kernels python3 -m benchmarks.ncu_targets
    ncu --import $OUT/decode_kernels.ncu-rep --page details > $OUT/decode_kernels.txt

(One kernel per name after two warm-up launches each: the KVQuant fused decode, nuq3-1%, and
Squeezed Attention's gathered decode attention at budget 1/8, both for the Llama-2-7B shape at
128K tokens.) Why: both kernels reach well under the copy bandwidth (KVQuant ~550 GB/s of packed
bytes, squeezed ~3 TB/s of gathered rows) and launch variants (warps, stages, prefetch, tile
sizes) did not move them; the counters say whether they wait on memory, shared memory,
barriers or instruction issue. GPU only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_squeezed import GPU_SHAPES, _one_layer, random_plan  # noqa: E402
from kernels.kvquant_decode import kvquant_decode_attention  # noqa: E402
from workbench.kvquant.fused import random_layer  # noqa: E402
from workbench.squeezed.fastpath import fast_squeezed_attention  # noqa: E402


def main(n: int = 128 * 1024, launches: int = 3, device: str = "cuda",
         backend: str = "triton") -> None:
    """The launches (device/backend: "cpu"/"torch" to check the script without a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ncu_targets needs a CUDA GPU.")
    gen = torch.Generator().manual_seed(0)
    shape = GPU_SHAPES[0]                                   # Llama-2-7B: 32 x 128 heads
    hq, kv, d = shape.q_heads, shape.kv_heads, shape.head_dim
    packed = random_layer(1, kv, n, d, 3, 0.01, 1, device=device, generator=gen)
    q = torch.randn(1, hq, d, generator=gen).to(device, torch.bfloat16)
    for _ in range(launches):
        kvquant_decode_attention(q, packed, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    del packed
    q4 = torch.randn(1, hq, 1, d, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(1, kv, n + 1, d, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(1, kv, n + 1, d, generator=gen).to(device, torch.bfloat16)
    plan = _one_layer(random_plan(shape, n, q4, 1 / 8, False, 16, gen, torch.bfloat16, device))
    for _ in range(launches):
        fast_squeezed_attention(plan, 0, q4, k, v, 16, backend)
    if device == "cuda":
        torch.cuda.synchronize()
    print("launched", flush=True)


if __name__ == "__main__":
    main()
