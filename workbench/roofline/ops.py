"""FLOPs and bytes of every operation of a transformer pass (the paper's per-operation count).

    ops = count_ops(shape, Workload("decode", batch=1, context=4096), Bits(w=16, a=16, kv=16))

A `Workload` is one forward pass: `new` tokens per sequence for `batch` sequences, with `past`
tokens already in the KV cache (prefill: past=0, new=prompt; decode: new=1, past=context;
encode: a whole sequence at once, attending both ways). Every `Op` gives, for ONE occurrence,
its FLOPs and the bytes it must move through memory at least (each input read once, each output
written once), split into weights, activations and KV cache; `count` says how many blocks hold
it. Bit widths: w for weights, a for activations (and the compute datapath), kv for the cache.
Multiply-adds count as 2 FLOPs. Element-wise costs use small fixed FLOP counts per element
(softmax 5, RMSNorm 4, LayerNorm 7, SiLU-gate 5, GELU 8, RoPE 3): they never decide the bound.

Attention, with `flash=False` (unfused, as in eager PyTorch): scores Q·Kᵀ written to memory,
softmax reads and writes them, P·V reads them again; the full query×key rectangle is computed
(masked entries too). With `flash=True` (FlashAttention tiling): one fused op, scores stay on
chip, causal blocks above the diagonal are skipped, and K/V are read once per KV head (the
query tiles that run at the same time share them through the L2 cache). Pass `block_q=128` to
price the pessimistic case where every tile of 128 query rows re-reads K/V from memory (a GQA
group's query heads share one read), as LLM-Viewer does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.roofline.shapes import ModelShape

PHASES = ("prefill", "decode", "encode")
_NORM_FLOPS = {True: 4, False: 7}  # per element: RMSNorm, LayerNorm


@dataclass(frozen=True)
class Bits:
    """Bit widths: w (weights), a (activations and compute), kv (KV cache). Floats allowed: an
    effective width like 4.25 counts a 4-bit format's scales (one fp16 per 64 values)."""

    w: float = 16
    a: float = 16
    kv: float = 16

    def __post_init__(self):
        for name in ("w", "a", "kv"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 1 <= v <= 32:
                raise WorkbenchError(f"{name}_bits={v!r} is not a bit width: use a number from 1 "
                                     "to 32 (16 for bf16, 8 for int8/fp8, 4 or 3 for low-bit).")


@dataclass(frozen=True)
class Workload:
    """One forward pass: `phase`, `batch` sequences, `context` tokens (prompt or cache length).

    prefill: the prompt of `context` tokens is processed (new=context, past=past_tokens).
    decode: one new token per sequence, attending to `context` cached tokens.
    encode: an encoder reads `context` tokens at once, attention in both directions.
    logits: "last" computes the LM head for the last token of each sequence (as generation
    does), "all" for every token (training, scoring).
    """

    phase: str
    batch: int = 1
    context: int = 1024
    logits: str = "last"
    past_tokens: int = 0

    def __post_init__(self):
        if self.phase not in PHASES:
            raise WorkbenchError(f"phase={self.phase!r}: use one of {', '.join(PHASES)}.")
        for name in ("batch", "context"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise WorkbenchError(f"{name}={v!r}: use a whole number of at least 1.")
        if self.logits not in ("last", "all"):
            raise WorkbenchError(f"logits={self.logits!r}: use 'last' or 'all'.")

    @property
    def new(self) -> int:
        """New tokens per sequence in this pass."""
        return 1 if self.phase == "decode" else self.context

    @property
    def past(self) -> int:
        """Tokens already cached before this pass."""
        return self.context if self.phase == "decode" else self.past_tokens

    @property
    def tokens(self) -> int:
        """Tokens processed by this pass, all sequences together."""
        return self.batch * self.new


@dataclass(frozen=True)
class Op:
    """One operation, one occurrence. FLOPs; bytes moved (weights, activations, KV cache)."""

    name: str
    group: str
    kind: str  # "matmul" (matrix units) or "vector" (element-wise units)
    flops: float
    weight_bytes: float
    act_bytes: float
    kv_bytes: float = 0.0
    count: int = 1

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP/byte."""
        return self.flops / self.bytes if self.bytes else math.inf


def _pairs(new: int, past: int, window: int | None, causal: bool) -> tuple[int, int]:
    """(query-key pairs computed unfused, pairs a causal/windowed fused kernel needs) per head."""
    keys = past + new
    full = new * keys
    if not causal:
        return full, full
    total = 0
    # sum over query positions p = past+1 .. past+new of min(p, window)
    lo, hi = past + 1, past + new
    if window is None or window >= hi:
        total = (lo + hi) * new // 2
    else:
        below = max(0, min(hi, window) - lo + 1)
        total = (lo + lo + below - 1) * below // 2 + (new - below) * window
    if window is not None:
        full = new * min(keys, window + new - 1)
    return full, total


def attention_ops(shape: ModelShape, wl: Workload, bits: Bits, flash: bool, window: int | None,
                  count: int, block_q: int | None = None) -> list[Op]:
    """Ops of the attention core (scores, softmax, weighted sum) for blocks with one window."""
    b, t, h, kvh, d = wl.batch, wl.new, shape.heads, shape.kv_heads, shape.head_dim
    causal = wl.phase != "encode"
    keys = wl.past + t if window is None else min(wl.past + t, window + t - 1)
    a, kv = bits.a / 8, bits.kv / 8
    full, needed = _pairs(t, wl.past, window, causal)
    q_bytes = b * t * h * d * a
    out_bytes = b * t * h * d * a
    kv_read = 2 * b * keys * kvh * d * kv  # K and V once per KV head
    if flash:
        group = h // kvh
        reads = max(1, math.ceil(t * group / block_q)) if block_q else 1  # K/V passes
        kv_bytes = max(kv_read, kv_read * reads * needed / full)  # skipped causal tiles read nothing
        flops = b * h * needed * (4 * d + 5)
        return [Op("attention (fused)", "attention core", "matmul", flops, 0,
                   q_bytes + out_bytes, kv_bytes, count)]
    scores = b * h * full
    return [
        Op("scores Q·Kᵀ", "attention core", "matmul", 2 * scores * d, 0,
           q_bytes + scores * a, kv_read / 2, count),
        Op("softmax", "attention core", "vector", 5 * scores, 0, 2 * scores * a, 0, count),
        Op("probs·V", "attention core", "matmul", 2 * scores * d, 0,
           scores * a + out_bytes, kv_read / 2, count),
    ]


def layer_ops(shape: ModelShape, wl: Workload, bits: Bits, flash: bool = True,
              block_q: int | None = None) -> list[Op]:
    """Ops of the transformer blocks; `count` = number of blocks sharing each op."""
    n, hid = wl.tokens, shape.hidden
    w, a, kv = bits.w / 8, bits.a / 8, bits.kv / 8
    layers = shape.layers
    ops: list[Op] = []
    for norm in shape.norms:
        vecs = n if norm.size == hid else n * shape.heads  # per-head q/k norms
        ops.append(Op(norm.name, "norm", "vector", _NORM_FLOPS[norm.rms] * vecs * norm.size,
                      norm.params * w, 2 * vecs * norm.size * a, 0, layers))
    for lin in shape.linears:
        flops = 2 * n * lin.in_features * lin.out_features + (n * lin.out_features if lin.bias else 0)
        ops.append(Op(lin.name, "attention projections" if lin.group == "attention" else "MLP",
                      "matmul", flops, lin.params * w,
                      n * (lin.in_features + lin.out_features) * a, 0, layers))
    qk = n * (shape.heads + shape.kv_heads) * shape.head_dim
    if shape.rotary:
        ops.append(Op("rotary embedding", "attention core", "vector", 3 * qk, 0, 2 * qk * a, 0,
                      layers))
    if wl.phase != "encode":
        kv_new = 2 * n * shape.kv_heads * shape.head_dim
        ops.append(Op("KV cache write", "attention core", "vector", 0, 0, kv_new * a,
                      kv_new * kv, layers))
    for window, count in shape.windows:
        ops += attention_ops(shape, wl, bits, flash, window, count, block_q)
    i = shape.intermediate
    if shape.gated_mlp:
        ops.append(Op("act(gate)·up", "MLP", "vector", 5 * n * i, 0, 3 * n * i * a, 0, layers))
    else:
        ops.append(Op("activation", "MLP", "vector", 8 * n * i, 0, 2 * n * i * a, 0, layers))
    ops.append(Op("residual adds", "elementwise", "vector", 2 * n * hid, 0, 6 * n * hid * a, 0,
                  layers))
    return ops


def count_ops(shape: ModelShape, wl: Workload, bits: Bits = Bits(), flash: bool = True,
              block_q: int | None = None) -> list[Op]:
    """All ops of one forward pass: embeddings, the blocks, final norms and the LM head."""
    if wl.phase == "decode" and not shape.is_decoder:
        raise WorkbenchError(f"{shape.name} is an encoder: it has no decode phase. Use "
                             "phase='encode' (the whole sequence at once).")
    if wl.phase == "encode" and shape.is_decoder:
        raise WorkbenchError(f"{shape.name} is a decoder: use phase='prefill' or 'decode'.")
    n, w, a = wl.tokens, bits.w / 8, bits.a / 8
    ops = [Op(f"lookup {name}", "embedding", "vector", 0, n * width * w, n * width * a, 0, 1)
           for name, _, width in shape.embeddings]
    if len(shape.embeddings) > 1:
        ops.append(Op("embedding sum", "embedding", "vector", (len(shape.embeddings) - 1) *
                      n * shape.hidden, 0, n * shape.hidden * a, 0, 1))
    ops += layer_ops(shape, wl, bits, flash, block_q)
    for norm in shape.outer_norms:
        ops.append(Op(norm.name, "norm", "vector", _NORM_FLOPS[norm.rms] * n * norm.size,
                      norm.params * w, 2 * n * norm.size * a, 0, 1))
    if shape.lm_head is not None:
        rows = n if wl.logits == "all" else wl.batch
        head = shape.lm_head
        ops.append(Op("LM head", "LM head", "matmul", 2 * rows * head.in_features *
                      head.out_features, head.params * w,
                      rows * (head.in_features * a + head.out_features * 4), 0, 1))
    return ops
