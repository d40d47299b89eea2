"""KVQuantCache: a transformers Cache that holds packed low-bit keys and values.

    cache = KVQuantCache(model, "nuq3-1%", calibration)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=50)
    cache.memory()   # bytes held, bytes per token vs fp16

What is held per layer (all of it counted by `nbytes`): bit-packed codes of keys and values,
per-token fp16 ranges (per-group ranges for KIVI-like keys), the sparse outliers (int32 index +
fp16 delta each), keys waiting for a full group (KIVI-like only), and with `recent_window` the
newest tokens not yet quantized (as the model gives them). No dequantized copy is
kept: `update` dequantizes the whole layer for the attention of the current step and lets it go
(the PyTorch reference path; on a GPU the fused decode kernel in `kernels/kvquant_decode.py`
reads the packed codes directly instead).

Pre-RoPE keys. In transformers 5 the attention applies RoPE before `cache.update`, so the cache
receives post-RoPE keys. This cache undoes the rotation with the model's own rotary embedding at
the positions it holds (tokens are numbered 0, 1, 2, ... as they arrive), quantizes the pre-RoPE
keys, and re-applies RoPE after dequantizing. Undo/redo is exact up to float32 rounding, so the
attached model needs no hook and no change. With left-padded batches the numbering is off by the
padding; the rotation still cancels exactly, only the channel statistics blur slightly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from workbench.errors import WorkbenchError
from workbench.kvquant.anatomy import KVGeometry, Rotary, geometry
from workbench.kvquant.calibration import Calibration, default_tables
from workbench.kvquant.methods import QuantSpec, method
from workbench.kvquant.quantize import LayerTables, Quantized, dequantize, quantize, rotates


class KVQuantLayer(DynamicLayer):
    """One layer of `KVQuantCache` (module docstring)."""

    is_croppable = False

    def __init__(self, spec: QuantSpec, tables: LayerTables | None, rotary: Rotary | None,
                 append_backend: str = "torch", recent_window: int = 0):
        super().__init__()
        self.spec, self.tables, self.rotary = spec, tables, rotary
        self.append_backend = append_backend
        self.recent_window = recent_window
        self.length = 0                             # tokens held: quantized + recent
        self.recent_k: torch.Tensor | None = None   # (B, H, r, D) post-RoPE, model dtype
        self.recent_v: torch.Tensor | None = None
        self._packed = None                         # the kernel's view, until the next flush
        self.qk: Quantized | None = None           # quantized keys (pre-RoPE if spec.pre_rope)
        self.qv: Quantized | None = None
        self.pending_k: torch.Tensor | None = None  # (B, H, p, D) fp16, waiting for a group
        self.fp_k: torch.Tensor | None = None       # fp16 method: plain fp16 storage
        self.fp_v: torch.Tensor | None = None
        self.growing = None     # GrowingPack while `fused_decode` is on: the kernel's sparse part

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        if self.tables is not None:         # calibrations load on the CPU; the cache follows
            self.tables = self.tables.to(self.device)      # the model's device
        self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)
        self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def _cos_sin(self, start: int, stop: int):
        return self.rotary.cos_sin_range(start, stop, self.device)

    @property
    def recent_len(self) -> int:
        """Tokens held in the recent window (not yet quantized)."""
        return 0 if self.recent_k is None else self.recent_k.shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new (B, H, n, D) post-RoPE keys and values; return the keys and values of
        every cached token, dequantized (post-RoPE keys), in the input dtype.

        With a recent window the new tokens join the window first; once it holds
        `recent_window` tokens or more, all of them are quantized together. Inside
        `fused_decode` a decode step (n = 1) returns its inputs unchanged: the attention
        reads the packed codes (`packed`) and the window (`recent`) instead."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        spec, n = self.spec, key_states.shape[-2]
        self.length += n
        if spec.is_fp16:
            def cat(old, new):
                return new.half() if old is None else torch.cat([old, new.half()], 2)
            self.fp_k, self.fp_v = cat(self.fp_k, key_states), cat(self.fp_v, value_states)
            return self.fp_k.to(self.dtype), self.fp_v.to(self.dtype)

        if self.recent_window:
            k_new, v_new = key_states, value_states
            if self.recent_k is not None:
                k_new = torch.cat([self.recent_k, k_new], 2)
                v_new = torch.cat([self.recent_v, v_new], 2)
            if k_new.shape[2] >= self.recent_window:
                self._quantize_tokens(k_new, v_new)
                self.recent_k = self.recent_v = None
            else:
                self.recent_k, self.recent_v = k_new, v_new
        else:
            self._quantize_tokens(key_states, value_states)
        if self.growing is not None and n == 1 and self.pending_k is None:
            return key_states, value_states     # fused decode: `packed` + `recent` instead
        return self._all_dequantized()

    def _quantize_tokens(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize (B, H, n, D) post-RoPE keys and values, the next tokens after those
        already quantized, and append their codes."""
        spec, n = self.spec, key_states.shape[-2]
        start = self.length - n             # `update` counted them; nothing stays after them
        keys = key_states.float()
        if spec.pre_rope:
            keys = Rotary.undo(keys, *self._cos_sin(start, start + n))
        qv = self._quantize(value_states, "v", start)
        self.qv = qv if self.qv is None else self.qv.append(qv)
        group = spec.key_token_group
        if group > 1:                                   # KIVI-like: whole groups of tokens only
            pend = keys.half() if self.pending_k is None else torch.cat([self.pending_k,
                                                                         keys.half()], 2)
            full = pend.shape[2] // group * group
            done = 0 if self.qk is None else self.qk.seq_len
            if full:
                qk = quantize(pend[:, :, :full].float(), spec, "k", self.tables, done)
                self.qk = qk if self.qk is None else self.qk.append(qk)
            self.pending_k = pend[:, :, full:]
        else:
            qk = self._quantize(keys, "k", start)
            self.qk = qk if self.qk is None else self.qk.append(qk)
            if self.growing is not None:
                self.growing.add(qk, qv)
        self._packed = None

    def _all_dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S, D) post-RoPE keys and values of every held token, in the model dtype."""
        spec = self.spec
        parts_k, parts_v = [], []
        if self.qk is not None or self.pending_k is not None:
            parts = []
            if self.qk is not None:
                parts.append(dequantize(self.qk, spec, "k", self.tables))
            if self.pending_k is not None and self.pending_k.shape[2]:
                parts.append(self.pending_k.float())
            k_q = torch.cat(parts, 2)                                   # (B, H, S_q, D)
            if spec.pre_rope:
                k_q = Rotary.apply(k_q, *self._cos_sin(0, k_q.shape[2]))
            parts_k.append(k_q.to(self.dtype))
            parts_v.append(dequantize(self.qv, spec, "v", self.tables).to(self.dtype))
        if self.recent_k is not None:
            parts_k.append(self.recent_k.to(self.dtype))
            parts_v.append(self.recent_v.to(self.dtype))
        return torch.cat(parts_k, 2), torch.cat(parts_v, 2)

    def _quantize(self, x: torch.Tensor, kind: str, start: int) -> Quantized:
        """New tokens' codes: the reference quantizer, or the quantize-and-pack kernel (the
        same result from one launch) with append_backend="triton" ("auto": on CUDA tensors)."""
        backend = self.append_backend
        if backend == "auto":
            backend = "triton" if x.is_cuda else "torch"
        if backend == "torch":
            return quantize(x, self.spec, kind, self.tables, start)
        from workbench.kvquant.append import quantize_appended

        return quantize_appended(x, self.spec, kind, self.tables, start, backend=backend)

    def start_fused(self) -> None:
        """Keep the kernel's view of this layer up to date from now on (`packed`)."""
        from workbench.kvquant.fused import GrowingPack

        rot = self.rotary.module
        self.growing = GrowingPack(self.tables, rot.inv_freq,
                                   float(getattr(rot, "attention_scaling", 1.0)),
                                   v_hadamard=rotates(self.spec, "v"))
        if self.qk is not None:
            self.growing.add(self.qk, self.qv)

    def stop_fused(self) -> None:
        self.growing = None
        self._packed = None

    def packed(self):
        """The fused decode kernel's `PackedKV` of every quantized token (after `start_fused`);
        made once per flush of the recent window (every token without a window), reused by
        the decode steps in between. None while no token is quantized yet."""
        if self.growing is None:
            raise WorkbenchError("packed() needs a layer inside `fused_decode`.")
        if self.qk is None:
            return None
        if self._packed is None:
            self._packed = self.growing.packed(self.qk, self.qv)
        return self._packed

    def recent(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The recent window's post-RoPE keys and values (B, H, r, D), or None."""
        return None if self.recent_k is None else (self.recent_k, self.recent_v)

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (codes, ranges, outliers, pending fp16 keys,
        the recent window)."""
        total = 0
        for q in (self.qk, self.qv):
            total += q.nbytes() if q is not None else 0
        for t in (self.pending_k, self.fp_k, self.fp_v, self.recent_k, self.recent_v):
            total += t.numel() * t.element_size() if t is not None else 0
        return total

    def reset(self) -> None:
        self.length, self.qk, self.qv = 0, None, None
        self.pending_k = self.fp_k = self.fp_v = None
        self.recent_k = self.recent_v = self._packed = None
        self.is_initialized = False
        if self.growing is not None:
            self.start_fused()

    def crop(self, tokens_to_remove: int) -> None:
        raise WorkbenchError("KVQuantCache cannot be cropped (assisted generation / speculative "
                             "decoding need a croppable cache; use DynamicCache there).")

    def _select(self, index: torch.Tensor) -> None:
        index = index.to("cpu").long()
        if self.qk is not None:
            self.qk = self.qk.select_batch(index)
        if self.qv is not None:
            self.qv = self.qv.select_batch(index)
        self._packed = None
        for name in ("pending_k", "fp_k", "fp_v", "recent_k", "recent_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[index.to(t.device)])
        if self.growing is not None:        # rows changed: re-sort the sparse part once
            self.start_fused()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._select(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            held = (self.fp_k, self.recent_k, self.pending_k)
            b = self.qv.batch if self.qv is not None else \
                next(t.shape[0] for t in held if t is not None)
            self._select(torch.arange(b).repeat_interleave(repeats))


class KVQuantCache(Cache):
    """A Cache of packed quantized keys and values for a Llama-like model (module docstring).

    model: the model it will serve (geometry, rotary embedding, calibration check).
    spec: a `QuantSpec` or a method name ("nuq3-1%", "kivi-3", "atom-4", "fp16", ...).
    calibration: a `Calibration` for this model; needed by KVQuant methods.
    append_backend: how new tokens are quantized: "auto" (the default: the quantize-and-pack
    kernel for CUDA tensors, the reference quantizer elsewhere), "torch" (the reference) or
    "triton" (the kernel, `workbench.kvquant.append`: the same codes and outliers from one
    launch per layer and kind; on CPU only under the Triton interpreter). On the H200 it took
    generation with `fused_decode` and every token quantized from 206-231 to 171 ms/token
    (benchmarks/results/kvquant_generate_h200.json).
    recent_window: the newest tokens, fewer than this many, stay unquantized (as the model gives
    them, bytes counted) and are quantized together once the window fills (KIVI keeps such a
    residual window too). A prompt of that length or longer is quantized whole at once, so
    perplexity over a prompt is unaffected; during generation a layer quantizes once per
    `recent_window` tokens instead of once per token, and `fused_decode` re-packs the kernel's
    view only then: per-token quantization makes a GPU decode step launch-bound (H200, 135M
    model: 52-80 ms/token over two runs with recent_window=64, against 111-171 with 0; bf16
    DynamicCache 24-43: the host CPU's speed varies, and the step is launch-bound).
    0 (the default): every token is quantized as it arrives, as in the paper, so memory and
    quality numbers mean exactly the quantized cache.
    """

    def __init__(self, model, spec: QuantSpec | str = "nuq3-1%",
                 calibration: Calibration | None = None, append_backend: str = "auto",
                 recent_window: int = 0):
        if append_backend not in ("torch", "triton", "auto"):
            raise WorkbenchError(f"append_backend must be 'torch', 'triton' or 'auto', got "
                                 f"{append_backend!r}.")
        if not isinstance(recent_window, int) or recent_window < 0:
            raise WorkbenchError(f"recent_window must be an int >= 0, got {recent_window!r}.")
        self.spec = method(spec) if isinstance(spec, str) else spec
        self.geometry: KVGeometry = geometry(model)
        if self.spec.is_fp16:
            tables = [None] * self.geometry.layers
        elif self.spec.needs_calibration:
            if calibration is None:
                raise WorkbenchError(
                    f"Method {self.spec.name!r} needs a calibration for this model: pass "
                    "calibration=calibrate(model, tokenizer) or Calibration.load(path, model).")
            calibration.check_model(model)
            tables = [calibration.tables(i, self.spec) for i in range(self.geometry.layers)]
        else:
            tables = [default_tables(self.spec)] * self.geometry.layers
        if not self.spec.is_fp16 and self.geometry.head_dim % 32:
            raise WorkbenchError(f"head_dim {self.geometry.head_dim} is not a multiple of 32: "
                                 "the packed layout needs whole 32-bit words per bit plane.")
        rotary = Rotary(model) if self.spec.pre_rope and not self.spec.is_fp16 else None
        layers = [KVQuantLayer(self.spec, t, rotary, append_backend, recent_window)
                  for t in tables]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def memory(self) -> dict:
        """Bytes held, tokens, bytes per token, and the same for an fp16 cache of the model."""
        tokens = self.get_seq_length()
        held = self.nbytes()
        fp16 = self.geometry.fp16_bytes_per_token()
        per_token = held / tokens if tokens else float("nan")
        elements = 2 * self.geometry.layers * self.geometry.kv_heads * self.geometry.head_dim
        return {"method": self.spec.name, "tokens": tokens, "bytes": held,
                "bytes_per_token": per_token, "fp16_bytes_per_token": fp16,
                "bits_per_element": 8 * per_token / elements if tokens else float("nan"),
                "compression": fp16 / per_token if tokens else float("nan")}
