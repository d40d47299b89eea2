"""Calibration on real text: Fisher sensitivity, per-channel key ranges, level histograms.

    calib = calibrate(model, tokenizer)                      # ~16 x 512 tokens of ShareGPT text
    calib.save("smollm2.kvq.safetensors"); calib = Calibration.load(path, model)
    tables = calib.tables(layer, method("nuq3-1%"))          # levels, table, key ranges

What is measured, per layer (forward + backward passes of the real model, weights frozen):
- pre- and post-RoPE keys (`k_proj` outputs, and the same rotated) and values (`v_proj`), and
  their Fisher information: the squared gradient of the language-model loss with respect to
  each of those activations (post-RoPE gradients are the pre-RoPE ones rotated).
- per-channel key ranges (H, D): the outlier_fraction/2 and 1 - outlier_fraction/2 quantiles
  over calibration tokens (min and max for fraction 0), pre- and post-RoPE; and, for each
  fraction > 0, ranges whose outlier budget is shared across the layer's channels by Fisher
  information (`allocated_channel_ranges`, variant suffix "a"), and ranges whose one budget is
  shared across every layer's channels (variant suffix "m": sensitive layers get more).
- per-layer value outlier counts (smallest, largest per token) whose sum over layers is f of a
  token's value elements over all layers, chosen to minimise the Fisher-weighted 3-bit rounding
  error of the values (`model_value_tails`, variant "v.<f>m", used by value_outliers=
  "fisher-model"), with that variant's level histograms.
- the same value histograms for values rotated by the orthonormal Hadamard matrix (variant
  suffix "r", `value_rotation="hadamard"`; the gradient rotates with them).
- the Fisher matrix of the keys per KV head, E[g g^T] (H, D, D) of the loss gradients g, pre-
  and post-RoPE ("k.pre.fim", "k.post.fim"): key_rounding="feedback" rounds against it.
- histograms (n_bins over [-1, 1]) of the normalized inlier values per KV head, as counts and
  as summed Fisher information: the level tables for any bit width, per head or per layer (the
  heads' histograms summed), come from these by 1-D k-means in milliseconds
  (`levels.kmeans_levels`), so one calibration serves every method and bit width.
The first token of each window is left out (it is the attention sink, kept exact at inference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels.hadamard import hadamard
from workbench.errors import WorkbenchError
from workbench.kvquant.anatomy import Rotary, attention_modules, geometry, model_fingerprint
from workbench.kvquant.levels import (
    histogram,
    kmeans_levels,
    nf_levels,
    qnorm_table,
    uniform_levels,
)
from workbench.kvquant.methods import QuantSpec
from workbench.kvquant.quantize import RANGE_TOLERANCE, LayerTables, _token_ranges, token_tails

FORMAT = "workbench-kvquant-calibration/1"
KEY_OUTLIER_SUFFIX = {"channel": "", "fisher": "a", "fisher-model": "m"}   # key range variants
FEEDBACK_DAMPING = 0.1  # key error feedback: Fisher matrix + 0.1 * its mean diagonal (the lowest
#                         held-out KL of 0.001, 0.01 and 0.1 at 4 bits)
MIN_CALIBRATION_TOKENS = 1024     # fewer tokens give noisy per-channel quantiles


def _fkey(fraction: float) -> str:
    return f"{fraction:g}"


@dataclass
class Calibration:
    """Calibration results for one model (see the module docstring).

    tensors: "k.pre.<f>.lo"/".hi" (layers, H, D) key ranges; "<var>.count"/".fisher"
    (layers, H, n_bins) histograms per KV head (files from before per-head tables: (layers,
    n_bins), per layer only) for var in k.pre.<f>, k.post.<f>, v.<f>; "k.pre.<f>a" and
    "k.post.<f>a" are the same with Fisher-allocated outlier thresholds (one budget per layer),
    "k.pre.<f>m" and "k.post.<f>m" with one budget over all layers; "v.<f>m.tails" (layers, 2)
    the model-wide value outlier allocation and "v.<f>m.count"/".fisher" its histograms.
    settings: how it was made (text source, windows, fractions, bins) and the model fingerprint.
    """

    tensors: dict[str, torch.Tensor]
    settings: dict
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def fractions(self) -> list[float]:
        return list(self.settings["outlier_fractions"])

    @property
    def layers(self) -> int:
        return int(self.settings["model"]["layers"])

    def _fraction(self, fraction: float, what: str) -> str:
        if not any(abs(fraction - f) < 1e-9 for f in self.fractions):
            raise WorkbenchError(
                f"This calibration was made for outlier fractions {self.fractions}; the method "
                f"keeps {fraction:g} of the {what} (outlier_fraction and key_outlier_share): "
                "recalibrate with outlier_fractions including it.")
        return _fkey(fraction)

    def key_variant(self, spec: QuantSpec) -> str:
        alloc = KEY_OUTLIER_SUFFIX[spec.key_outliers] if spec.key_fraction > 0 else ""
        frac = self._fraction(spec.key_fraction, "keys")
        var = f"k.{'pre' if spec.pre_rope else 'post'}.{frac}{alloc}"
        if f"{var}.lo" not in self.tensors:
            raise WorkbenchError(f"This calibration file has no key outlier ranges for "
                                 f"key_outliers={spec.key_outliers!r} (it was made by an older "
                                 "version): recalibrate with workbench.kvquant.calibrate, or use "
                                 "key_outliers='channel'.")
        return var

    def value_variant(self, spec: QuantSpec) -> str:
        alloc = "m" if spec.value_outliers == "fisher-model" and spec.value_fraction > 0 else ""
        rot = "r" if spec.value_rotation == "hadamard" else ""
        var = f"v.{self._fraction(spec.value_fraction, 'values')}{alloc}{rot}"
        if alloc and f"{var}.tails" not in self.tensors:
            raise WorkbenchError("This calibration file has no value outlier allocation for "
                                 "value_outliers='fisher-model' (it was made by an older "
                                 "version): recalibrate with workbench.kvquant.calibrate, or use "
                                 "value_outliers='token'.")
        if f"{var}.count" not in self.tensors:
            raise WorkbenchError("This calibration file has no histograms of Hadamard-rotated "
                                 "values (it was made by an older version): recalibrate with "
                                 "workbench.kvquant.calibrate, or use value_rotation='none'.")
        return var

    def _levels(self, variant: str, layer: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, table) of one layer: (2^b,) each, or (H, 2^b) for per-head k-means levels."""
        per_head = spec.levels_per == "head" and spec.levels in ("kmeans", "fisher")
        key = (variant, layer, spec.bits, spec.levels, spec.q_norm, per_head)
        if key not in self._memo:
            counts = self.tensors[f"{variant}.count"][layer]          # (H, n_bins) | (n_bins,)
            fisher = self.tensors[f"{variant}.fisher"][layer]
            if per_head and counts.dim() == 1:
                raise WorkbenchError("This calibration file has per-layer histograms only (it was "
                                     "made by an older version): recalibrate with "
                                     "workbench.kvquant.calibrate for per-head level tables, or "
                                     "use levels_per='layer'.")
            if not per_head and counts.dim() == 2:                    # one table for the layer
                counts, fisher = counts.sum(0), fisher.sum(0)
            if spec.levels == "uniform":
                levels = uniform_levels(spec.bits)
            elif spec.levels == "nf":
                levels = nf_levels(spec.bits)
            else:
                weights = counts if spec.levels == "kmeans" else fisher
                levels = torch.stack([kmeans_levels(w, spec.bits) for w in weights]) \
                    if per_head else kmeans_levels(weights, spec.bits)
            if spec.q_norm and levels.dim() == 2:
                table = torch.stack([qnorm_table(lv, c) for lv, c in zip(levels, counts,
                                                                          strict=True)])
            elif spec.q_norm:
                table = qnorm_table(levels, counts)
            else:
                table = levels
            self._memo[key] = (levels, table)
        return self._memo[key]

    def tables(self, layer: int, spec: QuantSpec) -> LayerTables:
        """Level tables and key ranges of `layer` for `spec`."""
        if not 0 <= layer < self.layers:
            raise WorkbenchError(f"Layer {layer} is out of range (0..{self.layers - 1}).")
        calibrated_keys = spec.key_axis == "channel" and spec.key_ranges == "calibrated"
        if not calibrated_keys and (spec.levels in ("kmeans", "fisher") or spec.q_norm):
            raise WorkbenchError("k-means/Fisher levels and Q-Norm are calibrated for per-channel "
                                 "keys with calibrated ranges (key_ranges='calibrated').")
        kvar, vvar = self.key_variant(spec), self.value_variant(spec)
        k_levels, k_table = self._levels(kvar, layer, spec)
        v_levels, v_table = self._levels(vvar, layer, spec)
        lo = hi = None
        if calibrated_keys:
            lo, hi = self.tensors[f"{kvar}.lo"][layer], self.tensors[f"{kvar}.hi"][layer]
        tails = None
        if f"{vvar}.tails" in self.tensors:
            tails = tuple(int(t) for t in self.tensors[f"{vvar}.tails"][layer])
        return LayerTables(k_levels, k_table, v_levels, v_table, lo, hi, tails,
                           self._key_feedback(layer, spec))

    def _key_feedback(self, layer: int, spec: QuantSpec) -> torch.Tensor | None:
        """U (H, D, D) for key_rounding="feedback" (`feedback_factor`), else None."""
        if spec.key_rounding != "feedback":
            return None
        name = f"k.{'pre' if spec.pre_rope else 'post'}.fim"
        if name not in self.tensors:
            raise WorkbenchError("This calibration file has no Fisher matrices of the keys (it "
                                 "was made by an older version): recalibrate with "
                                 "workbench.kvquant.calibrate, or use key_rounding='nearest'.")
        key = (name, layer)
        if key not in self._memo:
            self._memo[key] = feedback_factor(self.tensors[name][layer])
        return self._memo[key]

    # ---- files -------------------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Raise if this calibration was made for another model."""
        mine, theirs = self.settings["model"], model_fingerprint(model)
        def same(k):                        # the checksum is a float sum: its last digits
            a, b = mine[k], theirs.get(k)  # depend on the thread count that summed it
            if k == "k_proj_checksum" and isinstance(b, float):
                return abs(a - b) <= 1e-4 * max(1.0, abs(a))
            return a == b
        diff = [k for k in mine if k != "model" and not same(k)]
        if diff:
            raise WorkbenchError(
                f"This calibration was made for model {mine['model']!r} ({mine['layers']} layers, "
                f"{mine['kv_heads']} KV heads x {mine['head_dim']}), not for {theirs['model']!r} "
                f"({theirs['layers']} layers, {theirs['kv_heads']} KV heads x {theirs['head_dim']}"
                f"; differs in {', '.join(diff)}). Calibrate this model with "
                "workbench.kvquant.calibrate(model, tokenizer).")

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file: the tensors, and the settings as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "settings": json.dumps(self.settings)}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> Calibration:
        """Read a file written by `save`; with `model`, refuse a file made for another model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"No calibration file at {path}. Make one with "
                                 "calibrate(model, tokenizer).save(path).")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise WorkbenchError(f"{path} is not a workbench KVQuant calibration file.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        calib = cls(tensors, json.loads(meta["settings"]))
        if model is not None:
            calib.check_model(model)
        return calib


# ---- measuring -------------------------------------------------------------------------------


def collect_activations(model, ids: torch.Tensor, batch_size: int = 2, progress: bool = True):
    """Run forward + backward over `ids` (N, T) and return, per layer, pre-RoPE keys "k", values
    "v" and the loss gradients "gk", "gv" with respect to them, each (N, T, H, D) float32.
    Weights are frozen meanwhile."""
    from tqdm.auto import tqdm

    geo, attn = geometry(model), attention_modules(model)
    store: list[dict] = [dict() for _ in attn]
    out = [{"k": [], "v": [], "gk": [], "gv": []} for _ in attn]

    def hook(i, name):
        def fn(_mod, _inp, output):
            leaf = output.detach().requires_grad_(True)
            store[i][name] = leaf
            return leaf
        return fn

    handles = [m.k_proj.register_forward_hook(hook(i, "k")) for i, m in enumerate(attn)]
    handles += [m.v_proj.register_forward_hook(hook(i, "v")) for i, m in enumerate(attn)]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    shape = (geo.kv_heads, geo.head_dim)
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc="calibration (fwd+bwd)",
                          disable=not progress):
            batch = ids[start:start + batch_size].to(device)
            with torch.enable_grad():
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
            for i in range(len(attn)):
                for name in ("k", "v"):
                    leaf = store[i][name]
                    n, t = leaf.shape[:2]
                    out[i][name].append(leaf.detach().float().view(n, t, *shape).cpu())
                    out[i]["g" + name].append(leaf.grad.float().view(n, t, *shape).cpu())
            store = [dict() for _ in attn]
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return [{k: torch.cat(v) for k, v in layer.items()} for layer in out]


def _channel_ranges(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, H, D) -> lo, hi (H, D): quantiles f/2 and 1 - f/2 over tokens (min/max for 0)."""
    if fraction == 0:
        return x.amin(0), x.amax(0)
    m = x.shape[0]
    k_lo = max(1, int(round(fraction / 2 * m)))
    lo = x.kthvalue(k_lo, dim=0).values
    hi = x.kthvalue(m - k_lo + 1, dim=0).values
    return lo, hi


def allocated_channel_ranges(x: torch.Tensor, fisher: torch.Tensor, fraction: float,
                             grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ranges whose outliers share one budget by sensitivity.

    x, fisher (M, H, D) -> lo, hi (H, D). Channel c drops its j_lo smallest and j_hi largest
    calibration values (j from `grid`, counts of tokens) so that sum_c F_c * (hi_c - lo_c)^2,
    with F_c the channel's mean Fisher information, is smallest while the outliers over all
    channels stay at `fraction` of the elements (a Lagrangian search on the count price). The
    3-bit step of a channel is proportional to its range, so this spends the sparse budget where
    it shrinks the sensitivity-weighted rounding error most: heavy-tailed, sensitive channels get
    more outliers, light-tailed ones fewer (the paper gives every channel fraction/2 per tail).
    """
    m, h, d = x.shape
    c = h * d
    if grid is None:
        grid = torch.unique(torch.cat([torch.arange(0, 40),
                                       torch.round(torch.logspace(0, 1, 20) * 40)]).long())
    grid = grid[grid < m // 4]
    xs = x.reshape(m, c).sort(0).values                                 # (M, C)
    weight = fisher.reshape(m, c).double().mean(0)                      # (C,)
    lo_c, hi_c = xs[grid], xs[m - 1 - grid]                             # (G, C) each
    cost = (hi_c[None] - lo_c[:, None]).double().clamp_min(0) ** 2 * weight   # (G, G, C)
    count = (grid[:, None] + grid[None, :]).double().reshape(-1, 1)    # (G*G, 1)
    cost = cost.reshape(-1, c)
    budget = fraction * m * c

    def solve(price: float):
        pick = (cost + price * count).argmin(0)                         # (C,)
        return pick, float(count[pick].sum())

    lo_p, hi_p = 0.0, float(cost.max()) + 1.0
    for _ in range(60):
        mid = (lo_p + hi_p) / 2
        if solve(mid)[1] > budget:
            lo_p = mid
        else:
            hi_p = mid
    pick, _ = solve(hi_p)                                                # within the budget
    g, ar = len(grid), torch.arange(c)
    return lo_c[pick // g, ar].view(h, d), hi_c[pick % g, ar].view(h, d)


def head_histograms(u: torch.Tensor, fisher: torch.Tensor, inliers: torch.Tensor, n_bins: int,
                    head_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head histograms of normalized values u (heads along `head_dim`), counting only
    `inliers` (bool, same shape): counts and summed Fisher information, (H, n_bins) each."""
    heads = range(u.shape[head_dim])
    def sel(t, j):
        return t.select(head_dim, j)
    counts = [histogram(sel(u, j)[sel(inliers, j)], None, n_bins) for j in heads]
    fishers = [histogram(sel(u, j)[sel(inliers, j)], sel(fisher, j)[sel(inliers, j)], n_bins)
               for j in heads]
    return torch.stack(counts), torch.stack(fishers)


def key_histograms(var: str, kb, gb, lo, hi, fraction: float, n_bins: int) -> dict:
    """Ranges and histograms of one key variant: kb, gb (M, H, D) keys and Fisher information,
    lo, hi (H, D) -> {var.lo, var.hi: (H, D), var.count, var.fisher: (H, n_bins)}."""
    zero, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-6)
    u = (kb - zero) / scale
    inl = (u.abs() <= 1 + RANGE_TOLERANCE) if fraction > 0 else torch.ones_like(u, dtype=torch.bool)
    count, fisher = head_histograms(u.clamp(-1, 1), gb, inl, n_bins)
    return {f"{var}.lo": lo, f"{var}.hi": hi, f"{var}.count": count, f"{var}.fisher": fisher}


def _key_body(k_pre, gk, rotary: Rotary, rope: str):
    """(N, T, H, D) pre-RoPE keys and their loss gradients -> keys and Fisher information
    (M, H, D) of the tokens after the sink, pre- or post-RoPE (`rope`)."""
    n, t, h, d = k_pre.shape
    k, g = k_pre, gk
    if rope == "post":
        cos, sin = rotary.cos_sin(torch.arange(t))
        def rot(x):                                             # rotate as (N, H, T, D)
            return Rotary.apply(x.permute(0, 2, 1, 3), cos, sin).permute(0, 2, 1, 3)
        k, g = rot(k_pre), rot(gk)
    return k[:, 1:].reshape(-1, h, d), g[:, 1:].pow(2).reshape(-1, h, d)


def model_allocated_ranges(acts: list[dict], rotary: Rotary, fractions, n_bins: int) -> dict:
    """Key ranges whose outlier budget (`fraction` of all key elements of the model) is shared
    across the channels of *every* layer by Fisher information (variant suffix "m").

    `allocated_channel_ranges` over the (M, layers * H, D) keys of all layers at once: the loss
    is one, so Fisher information compares across layers, and layers whose keys hurt more
    (heavy-tailed, sensitive channels) get more of the budget. Returns, per variant, ranges
    (layers, H, D) and histograms (layers, H, n_bins) like `calibrate_layer`."""
    res: dict = {}
    h = acts[0]["k"].shape[2]
    for rope in ("pre", "post"):
        views = [_key_body(a["k"], a["gk"], rotary, rope) for a in acts]
        kb = torch.cat([v[0] for v in views], 1)                # (M, layers * H, D)
        gb = torch.cat([v[1] for v in views], 1)
        for f in [fr for fr in fractions if fr > 0]:
            var = f"k.{rope}.{_fkey(f)}m"
            lo, hi = allocated_channel_ranges(kb, gb, f)        # (layers * H, D)
            per = [key_histograms(var, kb[:, i * h:(i + 1) * h], gb[:, i * h:(i + 1) * h],
                                  lo[i * h:(i + 1) * h], hi[i * h:(i + 1) * h], f, n_bins)
                   for i in range(len(acts))]
            res.update({name: torch.stack([p[name] for p in per]) for name in per[0]})
        del views, kb, gb
    return res


def calibrate_layer(k_pre, v, gk, gv, rotary: Rotary, fractions, n_bins: int) -> dict:
    """One layer's ranges and histograms from (N, T, H, D) activations and their gradients.
    Fisher information per element = gradient squared; post-RoPE gradients are the pre-RoPE
    ones rotated (k_post = R k_pre, so dL/dk_post = R dL/dk_pre)."""
    n, t, h, d = k_pre.shape
    cos, sin = rotary.cos_sin(torch.arange(t))
    def to_bhtd(x):                                             # (N, T, H, D) -> (N, H, T, D)
        return x.permute(0, 2, 1, 3)
    k_post = to_bhtd(Rotary.apply(to_bhtd(k_pre), cos, sin))
    gk_post = to_bhtd(Rotary.apply(to_bhtd(gk), cos, sin))
    body = slice(1, None)                                       # drop the sink token
    res = {f"k.{rope}.fim": key_fisher_matrix(g[:, body])
           for rope, g in (("pre", gk), ("post", gk_post))}
    gk, gk_post = gk.pow(2), gk_post.pow(2)
    for rope, k, g in (("pre", k_pre, gk), ("post", k_post, gk_post)):
        kb, gb = k[:, body].reshape(-1, h, d), g[:, body].reshape(-1, h, d)     # (M, H, D)
        for f, alloc in [(fr, a) for fr in fractions for a in ("", "a")[:1 + (fr > 0)]]:
            lo, hi = allocated_channel_ranges(kb, gb, f) if alloc else _channel_ranges(kb, f)
            res.update(key_histograms(f"k.{rope}.{_fkey(f)}{alloc}", kb, gb, lo, hi, f, n_bins))
    hd = hadamard(d)
    for rot in ("", "r"):                                       # plain and Hadamard-rotated
        vr, gr = (v @ hd, gv @ hd) if rot else (v, gv)          # dL/d(vH) = (dL/dv) H
        vb = to_bhtd(vr[:, body])                               # (N, H, T-1, D)
        gvb = to_bhtd(gr[:, body]).pow(2)
        for f in fractions:
            res.update(value_histograms(f"v.{_fkey(f)}{rot}", vb, gvb, f, n_bins))
    return res


def key_fisher_matrix(g: torch.Tensor) -> torch.Tensor:
    """Fisher matrix of one layer's keys per KV head: g (N, T, H, D) loss gradients ->
    E[g g^T] over the N*T vectors, (H, D, D) float32. Key error feedback rounds against it."""
    g = g.reshape(-1, g.shape[-2], g.shape[-1]).double()          # (M, H, D)
    return (torch.einsum("mhd,mhe->hde", g, g) / len(g)).float()


def feedback_factor(fisher: torch.Tensor, damping: float = FEEDBACK_DAMPING) -> torch.Tensor:
    """(H, D, D) Fisher matrices -> U (H, D, D) float32, the upper Cholesky factor of
    (F + damping * mean(diag F) * I)^-1, as `kernels.kvquant_pack.round_with_feedback` takes it
    (GPTQ's damping keeps the inverse well conditioned)."""
    f = fisher.double()
    diag = f.diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
    f = f + damping * diag.mean(-1)[:, None, None].clamp_min(1e-30) * eye
    return torch.linalg.cholesky(torch.linalg.inv(f), upper=True).float()


def value_histograms(var: str, vb, gvb, fraction: float, n_bins: int, tails=None) -> dict:
    """Histograms of one layer's normalized inlier values: vb, gvb (N, H, T, D) values and
    Fisher information, per-token outliers by `fraction` (or `tails`) -> {var.count,
    var.fisher} (H, n_bins) each."""
    lo, hi, out = _token_ranges(vb, fraction, tails)
    zero = ((hi + lo) / 2).half().float()[..., None]
    scale = ((hi - lo) / 2).clamp_min(1e-4).half().float()[..., None]
    u = ((vb - zero) / scale).clamp(-1, 1)
    count, fisher = head_histograms(u, gvb, ~out, n_bins)
    return {f"{var}.count": count, f"{var}.fisher": fisher}


def value_tail_costs(v: torch.Tensor, fisher: torch.Tensor, max_tail: int, bits: int = 3
                     ) -> torch.Tensor:
    """Fisher-weighted rounding error of one layer's per-token values for every outlier split:
    v, fisher (M, H, D) -> cost (max_tail + 1, max_tail + 1), entry [a, b] with the a smallest
    and b largest elements of each token (over all heads) kept exact (error 0) and the rest
    rounded to `bits`-bit uniform levels over their token-head's range: sum of F * (x - q(x))^2.
    One table for every width (3 bits; on held-out windows this cost gave lower KL to fp16 at
    2, 3 and 4 bits than the range-width proxy sum F * (hi - lo)^2)."""
    m, h, d = v.shape
    flat = v.reshape(m, h * d)
    xs = flat.sort(-1).values
    cost = torch.zeros(max_tail + 1, max_tail + 1, dtype=torch.float64)
    inf = torch.tensor(float("inf"))
    top = 2 ** bits - 1
    for a in range(max_tail + 1):
        for b in range(max_tail + 1):
            inl = ((flat >= xs[:, a:a + 1]) & (flat <= xs[:, h * d - 1 - b:h * d - b])).view(m, h, d)
            lo = torch.where(inl, v, inf).amin(-1, keepdim=True)
            hi = torch.where(inl, v, -inf).amax(-1, keepdim=True)
            step = ((hi - lo) / top).clamp_min(1e-8)
            q = torch.round(((v - lo) / step).clamp(0, top)) * step + lo
            err = torch.where(inl, (v - q) ** 2, 0)
            cost[a, b] = float((err.double() * fisher.double()).sum())
    return cost


def allocate_value_tails(costs: list[torch.Tensor], budget: int) -> torch.Tensor:
    """Per-layer (smallest, largest) outlier counts per token whose sum over layers is at most
    `budget` and whose summed cost is least (exact, by dynamic programming over layers).
    costs: one (T, T) table per layer (`value_tail_costs`) -> (layers, 2) int64."""
    t = costs[0].shape[0]
    opts = [(a, b) for a in range(t) for b in range(t)]
    best = {0: (0.0, [])}                                     # outliers used -> (cost, choices)
    for c in costs:
        nxt: dict = {}
        for used, (tot, picks) in best.items():
            for a, b in opts:
                u = used + a + b
                if u > budget:
                    continue
                val = tot + float(c[a, b])
                if u not in nxt or val < nxt[u][0]:
                    nxt[u] = (val, picks + [(a, b)])
        best = nxt
    return torch.tensor(min(best.values(), key=lambda e: e[0])[1], dtype=torch.int64)


def model_value_tails(acts: list[dict], fractions, n_bins: int, max_tail: int | None = None,
                      rotate: bool = False) -> dict:
    """Per-token value outliers whose budget (f of a token's value elements over all layers,
    rounded once for the model, not per layer) is shared across layers by Fisher information
    (variant "v.<f>m", with `rotate` "v.<f>mr" for Hadamard-rotated values): per layer, tails
    (2,) and histograms like `calibrate_layer`'s."""
    res: dict = {}
    h, d = acts[0]["v"].shape[2:]
    hd = hadamard(d) if rotate else None

    def body(a):                                                # (N, T-1, H, D) values, grads
        v, g = a["v"][:, 1:].float(), a["gv"][:, 1:].float()
        return (v @ hd, g @ hd) if rotate else (v, g)

    for f in [fr for fr in fractions if fr > 0]:
        k = token_tails(f, h, d)
        top = max_tail if max_tail is not None else 6 * k
        costs = []
        for a in acts:
            v, g = body(a)
            costs.append(value_tail_costs(v.reshape(-1, h, d), g.pow(2).reshape(-1, h, d), top))
        tails = allocate_value_tails(costs, max(1, round(f * h * d * len(acts))))
        var = f"v.{_fkey(f)}m" + ("r" if rotate else "")
        per = []
        for i, a in enumerate(acts):
            v, g = body(a)
            vb, gvb = v.permute(0, 2, 1, 3), g.pow(2).permute(0, 2, 1, 3)
            per.append(value_histograms(var, vb, gvb, f, n_bins, tuple(tails[i].tolist())))
        res.update({name: torch.stack([p[name] for p in per]) for name in per[0]})
        res[f"{var}.tails"] = tails
    return res


def calibrate(model, tokenizer=None, *, ids: torch.Tensor | None = None, n_windows: int = 16,
              window: int = 512, source: str = "sharegpt",
              outlier_fractions: tuple[float, ...] = (0.0, 0.01), n_bins: int = 1024,
              batch_size: int = 2, progress: bool = True) -> Calibration:
    """Calibrate KVQuant for `model` on real text (module docstring).

    Text: `n_windows` windows of `window` tokens from `workbench.data.text_chunks(source)`
    (ShareGPT answers by default: varied, and different from the Python-docs evaluation text),
    or your own token ids `ids` (N, T). Needs at least MIN_CALIBRATION_TOKENS tokens.
    """
    from tqdm.auto import tqdm

    from workbench.data import text_chunks

    if ids is None:
        if tokenizer is None:
            raise WorkbenchError("Give a tokenizer (to cut calibration text) or token ids `ids`.")
        ids = text_chunks(tokenizer, window, n_windows, source)
        text = {"source": source, "windows": n_windows, "window_tokens": window}
    else:
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        text = {"source": "user token ids", "windows": int(ids.shape[0]),
                "window_tokens": int(ids.shape[1])}
    usable = ids.shape[0] * (ids.shape[1] - 1)
    if ids.shape[1] < 16 or usable < MIN_CALIBRATION_TOKENS:
        raise WorkbenchError(
            f"Calibration text too short: {ids.shape[0]} x {ids.shape[1]} tokens gives {usable} "
            f"usable tokens; at least {MIN_CALIBRATION_TOKENS} (windows of >= 16 tokens) are "
            "needed for per-channel quantiles. Give more or longer windows.")
    fractions = sorted({float(f) for f in outlier_fractions})
    rotary = Rotary(model)
    acts = collect_activations(model, ids, batch_size=batch_size, progress=progress)
    per_layer = [calibrate_layer(a["k"], a["v"], a["gk"], a["gv"], rotary, fractions, n_bins)
                 for a in tqdm(acts, desc="calibration (ranges, histograms)", disable=not progress)]
    tensors = {name: torch.stack([r[name] for r in per_layer]) for name in per_layer[0]}
    tensors.update(model_allocated_ranges(acts, rotary, fractions, n_bins))
    tensors.update(model_value_tails(acts, fractions, n_bins))
    tensors.update(model_value_tails(acts, fractions, n_bins, rotate=True))
    settings = {"text": text, "outlier_fractions": fractions, "n_bins": n_bins,
                "key_outliers": list(KEY_OUTLIER_SUFFIX), "value_outliers": ["token", "fisher-model"],
                "sink_tokens_excluded": 1, "model": model_fingerprint(model)}
    return Calibration(tensors, settings)


def default_tables(spec: QuantSpec, geo=None) -> LayerTables:
    """Tables for methods that need no calibration (uniform or NF levels, no Q-Norm)."""
    if spec.needs_calibration:
        raise WorkbenchError(f"Method {spec.name!r} needs a calibration: pass "
                             "calibration=calibrate(model, tokenizer) (or Calibration.load(path)).")
    lv = uniform_levels(spec.bits) if spec.levels == "uniform" else nf_levels(spec.bits)
    return LayerTables(lv, lv, lv, lv)
