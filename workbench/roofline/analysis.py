"""Roofline totals for a model on a chip: intensity, bound, predicted time, memory, what fits.

    a = analyze("llama-2-7b", "h200", phase="decode", batch=1, context=4096)
    print(a.summary())          # FLOPs, bytes, intensity vs ridge, bound, time, memory, max batch
    a.table()                   # one row per operation (FLOPs, bytes, intensity, time, bound)

Each op takes max(FLOPs / FLOP rate, bytes / bandwidth) seconds (the roofline), plus the chip's
fixed per-op latency (0 for datasheet chips; measured for "this machine"); a pass takes the sum
over its ops. Matrix ops run at the chip's matrix rate for the
activation width (`a_bits`), element-wise ops at its fp32 vector rate. Memory footprint is
weights + KV cache + the peak transient activations of one block; `memory_fraction` of the
chip's memory is usable (the rest goes to the runtime, as vLLM's gpu_memory_utilization=0.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from workbench.errors import WorkbenchError
from workbench.roofline.hardware import Chip, get_chip
from workbench.roofline.ops import Bits, Op, Workload, count_ops, layer_ops
from workbench.roofline.shapes import ModelShape, model_shape
from workbench.roofline.units import format_table, seconds, si


@dataclass(frozen=True)
class OpCost:
    """An op priced on a chip: seconds per occurrence, and which ceiling set it."""

    op: Op
    compute_time: float
    memory_time: float
    time: float
    bound: str  # "compute", "memory" or "latency" (the chip's fixed per-op cost dominates)

    @property
    def total_time(self) -> float:
        return self.time * self.op.count


@dataclass(frozen=True)
class Footprint:
    """Bytes held in device memory during the pass, and the usable capacity."""

    weights: float
    kv_cache: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def footprint(shape: ModelShape, wl: Workload, bits: Bits, flash: bool = True,
              capacity: float = float("inf")) -> Footprint:
    """Weights + KV cache (all sequences, sliding windows honoured) + peak activations, bytes."""
    a = bits.a / 8
    kv = 0.0
    if wl.phase != "encode":
        stored = wl.past + wl.new
        for window, count in shape.windows:
            keep = stored if window is None else min(stored, window)
            kv += count * 2 * wl.batch * keep * shape.kv_heads * shape.head_dim * bits.kv / 8
    n = wl.tokens
    hidden_live = 2 * n * shape.hidden
    mlp_live = n * shape.intermediate * (3 if shape.gated_mlp else 2)
    attn_live = n * (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim
    if not flash:
        attn_live += 2 * wl.batch * shape.heads * wl.new * (wl.past + wl.new)
    logits = 0.0
    if shape.lm_head is not None:
        rows = n if wl.logits == "all" else wl.batch
        logits = rows * shape.vocab * 4  # fp32 logits
    act = (hidden_live + max(mlp_live, attn_live)) * a + logits
    return Footprint(shape.params * bits.w / 8, kv, act, capacity)


def price(op: Op, chip: Chip, bits: Bits) -> OpCost:
    """Time of one op occurrence on `chip`: latency + max(FLOPs / rate, bytes / bandwidth)."""
    rate = chip.flops_for(bits.a) if op.kind == "matmul" else chip.vector_rate()
    compute, memory = op.flops / rate, op.bytes / chip.bandwidth
    time = chip.op_latency + max(compute, memory)
    bound = "compute" if compute >= memory else "memory"
    if chip.op_latency > max(compute, memory):
        bound = "latency"
    return OpCost(op, compute, memory, time, bound)


@dataclass
class Analysis:
    """The roofline of one forward pass of `shape` on `chip` (all sizes in FLOPs, bytes, s)."""

    shape: ModelShape
    chip: Chip
    workload: Workload
    bits: Bits
    flash: bool
    costs: list[OpCost]
    memory: Footprint
    memory_fraction: float
    block_q: int | None = None
    _fits: dict = field(default_factory=dict, repr=False)

    @property
    def flops(self) -> float:
        return sum(c.op.flops * c.op.count for c in self.costs)

    def bytes_of(self, kind: str = "all") -> float:
        """Bytes moved in the pass: 'all', 'weights', 'activations' or 'kv'."""
        get = {"all": lambda o: o.bytes, "weights": lambda o: o.weight_bytes,
               "activations": lambda o: o.act_bytes, "kv": lambda o: o.kv_bytes}[kind]
        return sum(get(c.op) * c.op.count for c in self.costs)

    @property
    def bytes(self) -> float:
        return self.bytes_of("all")

    @property
    def intensity(self) -> float:
        """Whole-pass arithmetic intensity, FLOP/byte."""
        return self.flops / self.bytes

    @property
    def ridge(self) -> float:
        """The chip's ridge point for this pass's compute width, FLOP/byte."""
        return self.chip.ridge(self.bits.a)

    @property
    def time(self) -> float:
        """Predicted seconds for the pass."""
        return sum(c.total_time for c in self.costs)

    def time_by_bound(self) -> dict[str, float]:
        out = {"memory": 0.0, "compute": 0.0, "latency": 0.0}
        for c in self.costs:
            out[c.bound] += c.total_time
        return out

    @property
    def bound(self) -> str:
        """'memory', 'compute' or 'latency': the ceiling that most of the time is spent under."""
        by = self.time_by_bound()
        return max(by, key=by.get)

    @property
    def tokens_per_s(self) -> float:
        """Tokens produced (decode) or processed (prefill, encode) per second, whole batch."""
        return self.workload.tokens / self.time

    def _search(self, what: str) -> int:
        """Largest batch (at this context) or context (at this batch) that fits in memory."""
        if what in self._fits:
            return self._fits[what]
        capacity = self.chip.memory * self.memory_fraction

        def fits(x: int) -> bool:
            wl = replace(self.workload, **{what: x})
            return footprint(self.shape, wl, self.bits, self.flash).total <= capacity

        lo, hi = 0, 1
        while hi <= 2 ** 31 and fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        self._fits[what] = lo
        return lo

    @property
    def max_batch(self) -> int:
        """Most sequences of this context that fit in usable memory (0: not even one)."""
        return self._search("batch")

    @property
    def max_context(self) -> int:
        """Longest context at this batch that fits in usable memory (ignores the model's limit)."""
        return self._search("context")

    def table(self, by: str = "op") -> list[dict]:
        """Rows per op (or per group with by='group'): FLOPs, bytes, intensity, time, bound."""
        if by not in ("op", "group"):
            raise WorkbenchError("table(by=...) takes 'op' or 'group'.")
        rows: dict[str, dict] = {}
        for c in self.costs:
            key = c.op.name if by == "op" else c.op.group
            r = rows.setdefault(key, {by: key, "count": 0, "GFLOP": 0.0, "MB": 0.0,
                                      "us": 0.0, "bounds": {}})
            r["count"] += c.op.count
            r["GFLOP"] += c.op.flops * c.op.count / 1e9
            r["MB"] += c.op.bytes * c.op.count / 1e6
            r["us"] += c.total_time * 1e6
            r["bounds"][c.bound] = r["bounds"].get(c.bound, 0.0) + c.total_time
        total = self.time
        out = []
        for r in rows.values():
            intensity = r["GFLOP"] * 1e3 / r["MB"] if r["MB"] else float("inf")
            out.append({by: r[by], "count": r["count"], "GFLOP": round(r["GFLOP"], 4),
                        "MB": round(r["MB"], 3), "FLOP/B": round(intensity, 2),
                        "time %": round(100 * r["us"] * 1e-6 / total, 1),
                        "bound": max(r["bounds"], key=r["bounds"].get)})
        return out

    def summary(self) -> str:
        """A few lines: the pass, the totals, the bound and time, memory and what fits."""
        wl, b = self.workload, self.bits
        m = self.memory
        limit = self.shape.max_positions
        lines = [
            f"{self.shape.name} on {self.chip.name}: {wl.phase}, batch {wl.batch}, context "
            f"{wl.context}, W{b.w:g}/A{b.a:g}/KV{b.kv:g}, {'flash' if self.flash else 'unfused'}"
            " attention",
            f"  {si(self.flops, 'FLOP')} over {si(self.bytes, 'B')} (weights "
            f"{si(self.bytes_of('weights'), 'B')}, KV {si(self.bytes_of('kv'), 'B')}, activations "
            f"{si(self.bytes_of('activations'), 'B')}): {self.intensity:.3g} FLOP/B vs ridge "
            f"{self.ridge:.3g}",
            f"  {self.bound}-bound: {seconds(self.time)} per pass, "
            f"{self.tokens_per_s:,.0f} tok/s",
            f"  memory: weights {si(m.weights, 'B')} + KV {si(m.kv_cache, 'B')} + activations "
            f"{si(m.activations, 'B')} = {si(m.total, 'B')} of {si(m.capacity, 'B')} usable "
            f"({'fits' if m.fits else 'does NOT fit'})",
            f"  fits: batch up to {self.max_batch:,} at this context; context up to "
            f"{self.max_context:,} at this batch" + (f" (model limit {limit:,})" if limit else ""),
        ]
        return "\n".join(lines)

    def print_table(self, by: str = "op") -> None:
        print(format_table(self.table(by)))


def analyze(model, chip: str | Chip = "h200", phase: str | None = None, batch: int = 1,
            context: int = 1024, w_bits: float = 16, a_bits: float = 16, kv_bits: float = 16,
            flash: bool = True, logits: str = "last", memory_fraction: float = 0.9,
            block_q: int | None = None, past_tokens: int = 0,
            blocks_only: bool = False) -> Analysis:
    """Roofline analysis of one forward pass.

    model: built-in name, local folder, hub id, transformers config, loaded model or ModelShape.
    phase: 'prefill' (process a prompt of `context` tokens), 'decode' (one token per sequence
    after `context` cached ones) or 'encode' (encoders); default decode, or encode for encoders.
    Bit widths are effective bits per element (4.25 counts group scales).
    blocks_only: price only the transformer blocks (no embeddings, final norm or LM head), e.g.
    to compare with a benchmark of one block.
    """
    shape = model_shape(model)
    chip = get_chip(chip)
    if phase is None:
        phase = "decode" if shape.is_decoder else "encode"
    if not 0 < memory_fraction <= 1:
        raise WorkbenchError(f"memory_fraction={memory_fraction}: use a fraction in (0, 1].")
    wl = Workload(phase, batch, context, logits, past_tokens)
    bits = Bits(w_bits, a_bits, kv_bits)
    ops = (layer_ops(shape, wl, bits, flash, block_q) if blocks_only
           else count_ops(shape, wl, bits, flash, block_q))
    costs = [price(op, chip, bits) for op in ops]
    mem = footprint(shape, wl, bits, flash, chip.memory * memory_fraction)
    return Analysis(shape, chip, wl, bits, flash, costs, mem, memory_fraction, block_q)
