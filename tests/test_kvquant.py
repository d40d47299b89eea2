"""KVQuant library: levels, packing, quantizers, calibration files, the packed cache on the real
embedded model and real text (accuracy), its fused decode inside model.generate, and clear
errors for bad input."""

import re
from dataclasses import replace

import pytest
import torch

from kernels.kvquant_decode import _kvq_decode_kernel
from kernels.kvquant_pack import _kvq_pack_kernel, quantize_pack_reference
from kernels.testing import fresh_seed
from kernels.testing import needs_triton as needs_triton_for
from workbench.errors import WorkbenchError
from workbench.kvquant import (
    Calibration,
    KVQuantCache,
    Rotary,
    calibrate,
    forward_with_cache,
    fused_decode,
    geometry,
    heldout_windows,
    kl_to_reference,
    load_calibration,
    method,
    perplexity,
)
from workbench.kvquant.anatomy import attention_modules
from workbench.kvquant.fused import GrowingPack, pack
from workbench.kvquant.levels import (
    bin_centers,
    histogram,
    kmeans_levels,
    lookup_levels,
    nf_levels,
    qnorm_table,
    round_to_levels,
    uniform_levels,
)
from workbench.kvquant.methods import ablation, leave_one_out
from workbench.kvquant.packing import pack_codes, unpack_codes
from workbench.kvquant.quantize import LayerTables, dequantize, quantize


@pytest.fixture(scope="module")
def model_tok():
    from workbench.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def calib(model_tok):
    return load_calibration(model_tok[0])


@pytest.fixture(scope="module")
def text_ids(model_tok):
    from workbench.data import text_chunks

    return text_chunks(model_tok[1], 256, 2, "python_docs")      # (2, 256) real text


# ---- levels and packing ----------------------------------------------------------------------


def test_levels():
    for b in (2, 3, 4):
        u = uniform_levels(b)
        assert len(u) == 2 ** b and u[0] == -1 and u[-1] == 1
        nf = nf_levels(b)
        assert torch.allclose(nf, -nf.flip(0)) and nf.abs().max() == 1
    with pytest.raises(WorkbenchError, match="5-bit"):
        uniform_levels(5)
    # k-means on two clusters puts levels at the clusters
    x = torch.cat([torch.full((1000,), -0.5), torch.full((1000,), 0.25)])
    lv = kmeans_levels(histogram(x, None, 512), 2)
    assert torch.isclose(lv, torch.tensor(-0.5), atol=0.01).any()
    assert torch.isclose(lv, torch.tensor(0.25), atol=0.01).any()
    # Q-Norm keeps the mean and std of the calibration values
    h = histogram(torch.randn(20000).clamp(-1, 1) * 0.4, None, 512)
    lv = kmeans_levels(h, 2)
    table = qnorm_table(lv, h)
    x = bin_centers(512)
    q = table[round_to_levels(x, lv).long()]
    w = h / h.sum()
    assert abs(float((w * q).sum() - (w * x).sum())) < 1e-4
    sd = lambda t: float((w * (t - (w * t).sum()) ** 2).sum().sqrt())  # noqa: E731
    assert abs(sd(q) - sd(x)) < 1e-4


def test_per_head_levels_round_and_look_up_each_head_with_its_table():
    gen = torch.Generator().manual_seed(fresh_seed())
    u = torch.rand(2, 3, 5, 8, generator=gen) * 2 - 1                   # (B, H, n, D)
    lv = torch.sort(torch.rand(3, 8, generator=gen) * 2 - 1, -1).values  # (H, 8) per head
    codes = round_to_levels(u, lv)
    deq = lookup_levels(lv, codes)
    for j in range(3):
        assert torch.equal(codes[:, j], round_to_levels(u[:, j], lv[j]))
        assert torch.equal(deq[:, j], lv[j][codes[:, j].long()])
        # each element went to its head's nearest level
        best = (u[:, j][..., None] - lv[j]).abs().argmin(-1)
        assert torch.equal(codes[:, j].long(), best)
    one = lv[0]
    assert torch.equal(lookup_levels(one, codes), one[codes.long()])     # one table: plain


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2 ** bits, (2, 3, 7, 64), dtype=torch.uint8)
    planes = pack_codes(codes, bits)
    assert planes.shape == (2, 3, 7, bits, 8) and planes.dtype == torch.uint8
    assert torch.equal(unpack_codes(planes), codes)


def test_method_names_and_errors():
    assert method("nuq3-1%") == method("kvquant", 3)
    assert method("nuq2").outlier_fraction == 0 and method("nuq4-1%").bits == 4
    assert method("kivi-2").key_ranges == "online" and method("atom-4").key_axis == "token"
    assert method("fp16").is_fp16
    with pytest.raises(WorkbenchError, match="not supported"):
        method("kvquant", 5)
    with pytest.raises(WorkbenchError, match="Unknown method"):
        method("gptq", 3)
    with pytest.raises(WorkbenchError, match="bit width"):
        method("kivi")
    full = ablation(3)[-1]                   # the ingredients added up give the default method
    assert full.name.endswith("KVQuant)") and replace(full, name="nuq3-1%") == method("nuq3-1%")
    assert len(leave_one_out(3)) == 13
    assert method("nuq3-1%").key_rounding == "feedback" and method("kivi-3").key_rounding == "nearest"
    with pytest.raises(WorkbenchError, match="key_rounding must be"):
        method("nuq3-1%", key_rounding="stochastic")
    assert ablation(3)[-1] == replace(method("nuq3-1%"), name=ablation(3)[-1].name)
    # one Fisher-allocated key outlier budget for the whole model, at every width
    assert all(method(f"nuq{b}-1%").key_outliers == "fisher-model" for b in (2, 3, 4))
    with pytest.raises(WorkbenchError, match="key_outliers"):
        method("nuq3-1%", key_outliers="global")
    # value outliers: f/2 per token tail by default; the model-wide allocation is a switch
    assert all(method(f"nuq{b}-1%").value_outliers == "token" for b in (2, 3, 4))
    with pytest.raises(WorkbenchError, match="value_outliers"):
        method("nuq3-1%", value_outliers="channel")
    # the sparse budget split evenly between keys and values (the paper), or by key_outlier_share
    spec = method("nuq3-1%")
    assert spec.key_fraction == spec.value_fraction == 0.01
    keys = replace(spec, key_outlier_share=0.75)
    assert (keys.key_fraction, keys.value_fraction) == (0.015, 0.005)
    assert method("nuq3").key_fraction == method("nuq3").value_fraction == 0.0
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(WorkbenchError, match="key_outlier_share"):
            replace(spec, key_outlier_share=bad)


def test_allocated_channel_ranges():
    """One outlier budget shared by sensitivity: the heavy-tailed channel gets more outliers,
    the total stays at the fraction, and a channel without Fisher weight gets none."""
    from workbench.kvquant.calibration import _channel_ranges, allocated_channel_ranges

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, 8, generator=gen)
    x[:, 0, 0] = torch.distributions.StudentT(2.0).sample((4000,))      # heavy tails
    fisher = torch.ones_like(x)
    fisher[:, 0, 7] = 0.0
    lo, hi = allocated_channel_ranges(x, fisher, 0.01)
    out = (x < lo) | (x > hi)                                           # (M, 1, 8)
    per_channel = out.float().mean(0)[0]
    assert abs(float(out.float().mean()) - 0.01) < 0.002
    assert per_channel[0] > 0.02 and per_channel[7] == 0
    q_lo, q_hi = _channel_ranges(x, 0.01)
    w = fisher.mean(0)
    assert float((w * (hi - lo) ** 2).sum()) < float((w * (q_hi - q_lo) ** 2).sum())


def test_model_allocated_ranges(model_tok):
    """One budget for all layers: a layer with heavy-tailed keys takes more than the fraction, a
    light-tailed one less, the total stays at the fraction, and the sensitivity-weighted squared
    range (what sets the rounding error) is smaller than with one budget per layer."""
    from workbench.kvquant.calibration import allocated_channel_ranges, model_allocated_ranges

    gen = torch.Generator().manual_seed(0)
    n, t, h, d = 8, 257, 3, 64
    light = torch.randn(n, t, h, d, generator=gen)
    heavy = torch.randn(n, t, h, d, generator=gen)
    heavy[..., :8] = torch.distributions.StudentT(2.0).sample((n, t, h, 8))
    acts = [{"k": x, "gk": torch.full_like(x, 1e-3)} for x in (light, heavy)]
    res = model_allocated_ranges(acts, Rotary(model_tok[0]), [0.0, 0.01], n_bins=64)
    lo, hi = res["k.pre.0.01m.lo"], res["k.pre.0.01m.hi"]                # (2, H, D)
    assert lo.shape == (2, h, d) and res["k.post.0.01m.count"].shape == (2, h, 64)
    body = [x[:, 1:].reshape(-1, h, d) for x in (light, heavy)]         # the sink is left out
    frac = [((x < lo[i]) | (x > hi[i])).float().mean() for i, x in enumerate(body)]
    assert frac[1] > 0.01 > frac[0]
    assert abs(float(sum(frac)) / 2 - 0.01) < 0.002
    cost_model = float(((hi - lo) ** 2).sum())                           # equal Fisher weights
    per_layer = [allocated_channel_ranges(x, torch.ones_like(x), 0.01) for x in body]
    cost_layer = sum(float(((b - a) ** 2).sum()) for a, b in per_layer)
    assert cost_model < cost_layer


def test_allocate_value_tails_is_exact():
    """The dynamic program finds the cheapest per-layer (smallest, largest) split within the
    budget: the same as trying every combination."""
    import itertools

    from workbench.kvquant.calibration import allocate_value_tails

    gen = torch.Generator().manual_seed(1)
    costs = [torch.rand(3, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    for budget in (0, 2, 5):
        got = allocate_value_tails(costs, budget)
        best = min((sum(float(c[a, b]) for c, (a, b) in zip(costs, pick, strict=True)), pick)
                   for pick in itertools.product(itertools.product(range(3), repeat=2), repeat=3)
                   if sum(a + b for a, b in pick) <= budget)
        assert int(got.sum()) <= budget
        assert sum(float(c[a, b]) for c, (a, b) in zip(costs, got.tolist(), strict=True)) \
            == pytest.approx(best[0])


def test_model_value_tails():
    """One value outlier budget for all layers: a layer whose tokens carry a few huge elements
    takes more than f/2 per tail, a Gaussian layer less, the total per token stays the same, the
    quantizer keeps exactly those elements, and the Fisher-weighted squared error of 3-bit
    uniform rounding over both layers is smaller than with f/2 per tail in every layer."""
    from workbench.kvquant.calibration import model_value_tails
    from workbench.kvquant.quantize import token_tails

    gen = torch.Generator().manual_seed(0)
    n, t, h, d = 4, 129, 3, 64
    light = torch.randn(n, t, h, d, generator=gen)
    heavy = torch.randn(n, t, h, d, generator=gen)
    spikes = torch.randint(0, h * d, (n, t, 3), generator=gen)
    heavy.view(n, t, h * d).scatter_(-1, spikes, 30.0)                  # 3 huge per token
    acts = [{"v": x, "gv": torch.full_like(x, 1e-2)} for x in (light, heavy)]
    res = model_value_tails(acts, [0.0, 0.01], n_bins=64)
    tails = res["v.0.01m.tails"]                                        # (2, 2)
    k = token_tails(0.01, h, d)
    assert res["v.0.01m.count"].shape == (2, h, 64)
    assert int(tails.sum()) == 2 * k * 2                                # same total outliers
    assert int(tails[1].sum()) > 2 * k > int(tails[0].sum())
    lv = uniform_levels(3)
    err = {}
    for name, spec_tails in (("model", [tuple(r) for r in tails.tolist()]), ("token", [None] * 2)):
        spec = method("kvquant", 3, levels="uniform", q_norm=False, sink_tokens=0,
                      key_outlier_share=0.5, value_rotation="none",
                      value_outliers="fisher-model" if name == "model" else "token")
        total = 0.0
        for x, tl in zip((light, heavy), spec_tails, strict=True):
            xb = x.permute(0, 2, 1, 3)                                   # (B, H, T, D)
            tables = LayerTables(lv, lv, lv, lv, value_tails=tl)
            q = quantize(xb, spec, "v", tables)
            assert q.outlier_index.numel() == n * t * (sum(tl) if tl else 2 * k)
            total += float(((dequantize(q, spec, "v", tables) - xb) ** 2).sum())
        err[name] = total
    assert err["model"] < err["token"]


# ---- quantizers ------------------------------------------------------------------------------


def test_quantize_outliers_and_sink_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 64, generator=gen)
    lv = nf_levels(3)
    lo, hi = x.amin((0, 2)) * 0.5, x.amax((0, 2)) * 0.5                 # many key outliers
    tables = LayerTables(lv, lv, lv, lv, lo, hi)
    spec = method("kvquant", 3, levels="nf", q_norm=False, sink_tokens=2, key_rounding="nearest")
    for kind in ("k", "v"):
        q = quantize(x, spec, kind, tables, start=0)
        back = dequantize(q, spec, kind, tables)
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, 40, 3, 8)
        assert torch.allclose(back[:, :, :2], x[:, :, :2], atol=2e-3)   # sinks exact (fp16)
        outl = (x < lo[None, :, None]) | (x > hi[None, :, None]) if kind == "k" else None
        if outl is not None:
            assert torch.allclose(back[outl], x[outl], atol=2e-2, rtol=1e-3)
        err = (back - x).abs()[:, :, 2:]
        assert float(err.mean()) < 0.25 * float(x.abs().mean())   # 3-bit NF, 64-wide
    # a key on the calibrated range's end, off by float32 rounding (the cache undoes RoPE),
    # stays an inlier in the reference and in the append kernel's reference
    k = hi[None, :, None, :].expand(1, 3, 4, 64) * (1 + 1e-7 * torch.tensor([-1.0, 0, 1, 3])
                                                    )[None, None, :, None]
    spec0 = replace(spec, sink_tokens=0)
    assert quantize(k, spec0, "k", tables).outlier_index.numel() == 0
    res = quantize_pack_reference(k.reshape(-1, 64), lv, lv, 3, lo=lo, hi=hi, heads=3,
                                  rows_per_head=4)[3]
    assert not res.any()
    assert quantize(k * 1.01 + 0.01, spec0, "k", tables).outlier_index.numel() == 3 * 4 * 64
    # appending later tokens gives the same as quantizing all at once (per-token methods)
    a = quantize(x[:, :, :30], spec, "v", tables, start=0)
    b = quantize(x[:, :, 30:], spec, "v", tables, start=30)
    whole = dequantize(quantize(x, spec, "v", tables), spec, "v", tables)
    assert torch.allclose(dequantize(a.append(b), spec, "v", tables), whole)


def test_hadamard_rotated_values():
    """Rotated values: dequantize undoes the rotation, outliers and sinks stay exact, and on
    vectors with a few large channels the rounding error is lower than without rotation."""
    from kernels.hadamard import hadamard

    hd = hadamard(64)
    assert torch.allclose(hd @ hd, torch.eye(64), atol=1e-6) and torch.equal(hd, hd.T)
    with pytest.raises(WorkbenchError, match="power-of-two"):
        hadamard(48)
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(1, 3, 200, 64, generator=gen)
    x[..., :3] *= 8                                                     # large channels
    lv = nf_levels(3)
    tables = LayerTables(lv, lv, lv, lv)
    plain = method("kvquant", 3, levels="nf", q_norm=False, value_rotation="none",
                   outlier_fraction=0.0, sink_tokens=1)
    rotated = replace(plain, value_rotation="hadamard")
    err = {}
    for spec in (plain, rotated):
        back = dequantize(quantize(x, spec, "v", tables), spec, "v", tables)
        assert torch.allclose(back[:, :, 0], x[:, :, 0], atol=1e-2)     # sink exact (fp16)
        err[spec.value_rotation] = float((back - x)[:, :, 1:].pow(2).mean())
    assert err["hadamard"] < 0.5 * err["none"], err
    spec = replace(rotated, outlier_fraction=0.02)                      # outliers: x exact
    q = quantize(x, spec, "v", tables)
    assert q.outlier_index.numel() > 0
    assert float((dequantize(q, spec, "v", tables) - x).abs().max()) < 0.5 * 8


# ---- the cache on the real model -------------------------------------------------------------


def test_rope_undo_matches_k_proj(model_tok, text_ids):
    """The cache's pre-RoPE keys (undone rotation) equal the k_proj outputs."""
    model = model_tok[0]
    geo = geometry(model)
    assert (geo.kv_heads, geo.q_heads, geo.head_dim) == (3, 9, 64)     # GQA by default
    captured = {}
    attn = attention_modules(model)[5]
    h = attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward_with_cache(model, text_ids[:1, :64], cache)
    h.remove()
    post = cache.layers[5].keys                                         # (1, 3, 64, 64)
    rot = Rotary(model)
    pre = Rotary.undo(post, *rot.cos_sin(torch.arange(64)))
    k_proj = captured["k"].view(1, 64, 3, 64).transpose(1, 2)
    torch.testing.assert_close(pre, k_proj, atol=1e-4, rtol=1e-4)


def test_rotary_table_slices_equal_direct(model_tok):
    """The cached cos/sin table the cache slices per step gives the rotary module's numbers."""
    rot = Rotary(model_tok[0])
    for start, stop in [(0, 5), (1000, 1001), (37, 1500), (0, 1)]:
        want = rot.cos_sin(torch.arange(start, stop))
        got = rot.cos_sin_range(start, stop, "cpu")
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_cache_holds_packed_codes_and_generates(model_tok, calib, text_ids):
    model, tok = model_tok
    cache = KVQuantCache(model, "nuq3-1%", calib, recent_window=0)     # every token quantized
    prompt = text_ids[:1, :120]
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    layer = cache.layers[0]
    assert layer.qk.codes.dtype == torch.uint8 and layer.qk.codes.shape[-2:] == (3, 8)
    assert layer.keys.numel() == 0                                      # no dequantized copy
    mem = cache.memory()
    assert mem["tokens"] == out.shape[1] - 1
    assert mem["compression"] > 3.5 and mem["bits_per_element"] < 4.5
    text = tok.decode(out[0, 120:])
    assert len(text.strip()) > 0


def test_cache_matches_fp16_and_orders_methods(model_tok, calib, text_ids):
    """Real text: fp16 cache = dense model; nuq3-1% beats ATOM-like and KIVI-like 3 bits."""
    model = model_tok[0]
    ids = text_ids[:1]
    with torch.no_grad():
        dense = model(ids).logits
        cache = KVQuantCache(model, "fp16")
        fp = forward_with_cache(model, ids, cache).logits
    assert (fp - dense).abs().max() < 0.05
    ppl = {name: perplexity(model, ids, name, calib, progress=False)["ppl"]
           for name in ("fp16", "atom-3", "kivi-3", "nuq3-1%", "nuq4-1%")}
    assert ppl["nuq3-1%"] < ppl["kivi-3"] < ppl["atom-3"]
    assert ppl["nuq4-1%"] < ppl["fp16"] * 1.03


def test_key_error_feedback_lowers_kl(model_tok, calib, text_ids):
    """Real text: rounding keys with Fisher error feedback (KVQuant's default) is closer to the
    unquantized model than nearest rounding, at the same bytes."""
    model = model_tok[0]
    nearest = method("nuq3-1%", key_rounding="nearest")
    rows = kl_to_reference(model, text_ids, ["nuq3-1%", nearest], calib, progress=False)
    assert 0 < rows[0]["kl"] < 0.9 * rows[1]["kl"]


def test_heldout_windows_and_specs(model_tok):
    """Settings are chosen on windows that neither the evaluation nor the calibration reads."""
    from workbench.data import text_chunks
    from workbench.kvquant.evaluate import HELDOUT_CHOICES, heldout_specs

    tok = model_tok[1]
    held = heldout_windows(tok)
    assert held.shape == (8, 1024)
    evaluation = text_chunks(tok, 1024, 8, "python_docs")
    calibration = text_chunks(tok, 512, 16, "sharegpt").reshape(-1)
    for w in held:
        assert not (evaluation == w).all(1).any()
        assert not any(torch.equal(w[:512], calibration[i:i + 512])
                       for i in range(0, len(calibration) - 511, 512))
    specs = heldout_specs((3,))
    assert specs[0] == method("nuq3-1%") and [s.name for s in specs[1:]] == list(HELDOUT_CHOICES)


def test_cache_batch_and_kivi_pending(model_tok, calib, text_ids):
    model = model_tok[0]
    cache = KVQuantCache(model, "kivi-3", recent_window=0)
    with torch.no_grad():
        forward_with_cache(model, text_ids[:, :100], cache)            # 64 quantized + 36 pending
        forward_with_cache(model, text_ids[:, 100:101], cache)
    layer = cache.layers[3]
    assert layer.qk.seq_len == 64 and layer.pending_k.shape[2] == 37
    assert cache.get_seq_length() == 101
    for window in (0, 64):                                          # quantized / all recent
        cache = KVQuantCache(model, "nuq3-1%", calib, recent_window=window)
        with torch.no_grad():
            forward_with_cache(model, text_ids[:, :50], cache)
        cache.batch_select_indices(torch.tensor([1]))
        layer = cache.layers[0]
        assert (layer.qv.codes if window == 0 else layer.recent_v).shape[0] == 1


def test_recent_window(model_tok, calib, text_ids):
    """The newest tokens stay unquantized until the window fills, then are quantized together:
    layer 0 (whose keys and values depend on the tokens alone) gets the same codes as a cache
    that quantizes every token as it arrives (keys per channel with calibrated ranges and
    values per token do not depend on how tokens are grouped); the window's bytes are counted
    and `update` returns the window's tokens as given."""
    model = model_tok[0]
    ids = text_ids[:1]
    caches = [KVQuantCache(model, "nuq3-1%", calib, recent_window=w) for w in (0, 16)]
    with torch.no_grad():
        for c in caches:
            forward_with_cache(model, ids[:, :10], c)                  # 10 < 16: all in fp16
    win = caches[1].layers[2]
    assert win.qk is None and win.recent_len == 10 and caches[1].get_seq_length() == 10
    assert win.nbytes() == 2 * 10 * 3 * 64 * 4                           # float32 K and V
    with torch.no_grad():
        for t in range(10, 17):
            for c in caches:
                forward_with_cache(model, ids[:, t:t + 1], c)
            if t == 14:
                assert win.qk is None and win.recent_len == 15
    assert win.qk.seq_len == 16 and win.recent_len == 1                 # flushed at 16
    full, win0 = caches[0].layers[0], caches[1].layers[0]
    assert torch.equal(full.qk.codes[:, :, :16], win0.qk.codes)
    assert torch.equal(full.qv.codes[:, :, :16], win0.qv.codes)
    first16 = full.qk.outlier_index[full.qk.outlier_index < 16 * 3 * 64]     # token-major index
    assert torch.equal(first16.sort().values, win0.qk.outlier_index.sort().values)
    assert win.nbytes() == win.qk.nbytes() + win.qv.nbytes() + 2 * 1 * 3 * 64 * 4
    k_all, v_all = win.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
    assert k_all.shape == (1, 3, 18, 64)
    assert torch.equal(k_all[:, :, 16:], win.recent_k)
    with pytest.raises(WorkbenchError, match="recent_window"):
        KVQuantCache(model, "nuq3-1%", calib, recent_window=-1)


# ---- fused decode inside model.generate (workbench.kvquant.attend) ---------------------------


def test_growing_pack_equals_pack_of_the_whole():
    """Chunks appended as a cache appends them (a prefill, then single tokens across block
    boundaries): the growing block-CSR equals the one sorted from the whole layer."""
    gen = torch.Generator().manual_seed(fresh_seed())
    b, h, d, block = 2, 3, 32, 32
    spec = method("kvquant", 3, outlier_fraction=0.05, sink_tokens=1, levels="nf", q_norm=False,
                  key_rounding="nearest")
    x = torch.randn(b, h, 140, d, generator=gen) * (1 + 3 * (torch.rand(d, generator=gen) > 0.9))
    lo, hi = x.amin((0, 2, 3)) * 0.8, x.amax((0, 2, 3)) * 0.8
    lo, hi = lo[:, None].expand(h, d).contiguous(), hi[:, None].expand(h, d).contiguous()
    lv = nf_levels(3)
    tables = LayerTables(lv, lv, lv, lv, lo, hi)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    grow = GrowingPack(tables, inv_freq, block=block)
    qk = qv = None
    for start, stop in [(0, 45), *[(t, t + 1) for t in range(45, 100)], (100, 140)]:
        ck = quantize(x[:, :, start:stop], spec, "k", tables, start)
        cv = quantize(-x[:, :, start:stop], spec, "v", tables, start)
        qk = ck if qk is None else qk.append(ck)
        qv = cv if qv is None else qv.append(cv)
        grow.add(ck, cv)
        if stop in (45, 63, 64, 65, 96, 99, 140):
            got, want = grow.packed(qk, qv), pack(qk, qv, tables, inv_freq, block=block)
            for name in ("k_ptr", "k_idx", "k_val", "k_tok", "v_ptr", "v_idx", "v_val"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (stop, name)
    assert grow.frozen_blocks == 140 // block


@pytest.mark.parametrize("window, prompt_len", [(0, 90), (8, 90), (16, 12)])
def test_fused_decode_generates_the_same_tokens(model_tok, calib, text_ids, window, prompt_len):
    """generate inside fused_decode (PyTorch reference of the kernel on this CPU): the same
    greedy tokens and, step by step, the same logits as the cache's dequantized path; with a
    recent window (kernel over the quantized tokens + attention over the window, merged),
    including steps before anything is quantized (a 12-token prompt in a 16-token window)."""
    model, tok = model_tok
    prompt = text_ids[:1, :prompt_len]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)

    def make():
        return KVQuantCache(model, "nuq3-1%", calib, recent_window=window)

    with torch.no_grad():
        plain = model.generate(prompt, past_key_values=make(), **kw)
        cache = make()
        with fused_decode(model, cache) as state:
            fused = model.generate(prompt, past_key_values=cache, **kw)
    assert torch.equal(plain, fused)
    layers = model.config.num_hidden_layers
    # decode steps that had quantized tokens to read: all 9, or those after the first flush
    assert state.fused_steps == (9 if prompt_len >= window else 6) * layers
    assert model.config._attn_implementation != "workbench_attention"   # switched back
    assert cache.layers[0].growing is None
    # logits of single decode steps against the dequantized path
    caches = [make() for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            forward_with_cache(model, prompt, c)
        nxt = prompt[:, -1:]
        for _ in range(3):
            ref = forward_with_cache(model, nxt, caches[0]).logits
            with fused_decode(model, caches[1]):
                got = forward_with_cache(model, nxt, caches[1]).logits
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
            nxt = ref[:, -1:].argmax(-1)


def test_fused_decode_batch_and_beams(model_tok, calib, text_ids):
    """Two sequences at once, and beam search (which reorders the cache's rows: the growing
    sparse part is rebuilt), give the dequantize path's tokens."""
    model, tok = model_tok
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    for prompt, extra in ((text_ids[:, :60], {}), (text_ids[:1, :60], {"num_beams": 2})):
        with torch.no_grad():
            want = model.generate(prompt, past_key_values=KVQuantCache(model, "nuq3-1%", calib),
                                  attention_mask=torch.ones_like(prompt), **kw, **extra)
            cache = KVQuantCache(model, "nuq3-1%", calib)
            with fused_decode(model, cache):
                got = model.generate(prompt, past_key_values=cache,
                                     attention_mask=torch.ones_like(prompt), **kw, **extra)
        assert torch.equal(got, want), extra


@needs_triton_for(_kvq_decode_kernel)
def test_fused_decode_runs_the_triton_kernel(model_tok, calib, text_ids):
    """One decode step through the Triton kernel (interpreter on CPU) matches the reference."""
    model, prompt = model_tok[0], text_ids[:1, :90]
    caches = [KVQuantCache(model, "nuq3-1%", calib) for _ in range(2)]
    nxt = prompt[:, -1:]
    with torch.no_grad():
        for c in caches:
            forward_with_cache(model, prompt[:, :40], c)
        with fused_decode(model, caches[0], backend="torch"):
            ref = forward_with_cache(model, nxt, caches[0]).logits
        with fused_decode(model, caches[1], backend="triton"):
            got = forward_with_cache(model, nxt, caches[1]).logits
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)


def test_fused_decode_errors(model_tok, calib):
    model = model_tok[0]
    for name in ("kivi-3", "atom-3", "fp16"):
        with pytest.raises(WorkbenchError, match="fused_decode needs"):
            with fused_decode(model, KVQuantCache(model, name, calib)):
                pass
    cache = KVQuantCache(model, "nuq3-1%", calib)
    with pytest.raises(WorkbenchError, match="packed"):
        cache.layers[0].packed()


@needs_triton_for(_kvq_pack_kernel)
@pytest.mark.parametrize("name,kind,start,tails", [
    ("nuq3-1%", "k", 0, None), ("nuq3-1%", "v", 0, None), ("nuq3-1%", "v", 7, (2, 1)),
    ("nuq2", "k", 0, None), ("atom-4", "k", 3, None), ("nuq4-1%", "v", 0, None),
    ("kivi-3", "v", 2, None),                       # values not rotated (KVQuant's are)
])
def test_quantize_appended_matches_reference(name, kind, start, tails):
    """The quantize-and-pack kernel path (interpreter here) gives the reference's codes, ranges
    and outliers exactly: calibrated per-channel keys, per-token keys and values, sinks."""
    from workbench.kvquant.append import quantize_appended

    gen = torch.Generator().manual_seed(fresh_seed())
    b, h, n, d = 2, 3, 5, 64
    x = torch.randn(b, h, n, d, generator=gen) * (1 + 3 * (torch.rand(d, generator=gen) > 0.9))
    spec = method(name)
    if name.startswith("atom"):
        spec = replace(spec, outlier_fraction=0.02)
    lv = nf_levels(spec.bits)
    from workbench.kvquant.calibration import feedback_factor

    g = torch.randn(h, d, 2 * d, generator=gen) * (torch.rand(h, d, 1, generator=gen) > 0.5)
    fisher = g @ g.transpose(1, 2) / (2 * d)                     # rank-deficient: damped inverse
    tables = LayerTables(lv, lv, lv, lv * 0.98, x.amin((0, 2)) * 0.7, x.amax((0, 2)) * 0.7,
                         value_tails=tails, key_feedback=feedback_factor(fisher))
    want = quantize(x, spec, kind, tables, start)
    got = quantize_appended(x, spec, kind, tables, start, backend="triton")
    assert torch.equal(got.codes, want.codes)
    for a, b_ in ((got.zero, want.zero), (got.scale, want.scale)):
        assert (a is None and b_ is None) or torch.equal(a, b_)
    order_g, order_w = got.outlier_index.argsort(), want.outlier_index.argsort()
    assert torch.equal(got.outlier_index[order_g], want.outlier_index[order_w])
    assert torch.equal(got.outlier_delta[order_g], want.outlier_delta[order_w])
    assert want.outlier_index.numel() > 0 or spec.outlier_fraction == 0


@needs_triton_for(_kvq_pack_kernel)
def test_cache_append_backend(model_tok, calib, text_ids):
    """A cache that appends through the kernel holds the same codes as the reference one."""
    model = model_tok[0]
    caches = [KVQuantCache(model, "nuq3-1%", calib, append_backend=bk, recent_window=0)
              for bk in ("torch", "triton")]
    with torch.no_grad():
        for c in caches:
            forward_with_cache(model, text_ids[:1, :40], c)
            forward_with_cache(model, text_ids[:1, 40:41], c)
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(la.qk.codes, lb.qk.codes) and torch.equal(la.qv.codes, lb.qv.codes)
        assert torch.equal(la.qv.zero, lb.qv.zero)
        assert la.qk.outlier_index.numel() == lb.qk.outlier_index.numel()
    with pytest.raises(WorkbenchError, match="append_backend"):
        KVQuantCache(model, "nuq3-1%", calib, append_backend="cuda")


# ---- calibration -----------------------------------------------------------------------------


@pytest.mark.slow
def test_calibrate_save_load(model_tok, tmp_path, text_ids):
    model, tok = model_tok
    cal = calibrate(model, ids=text_ids[:, :160].repeat(4, 1), progress=False)
    assert cal.tensors["k.pre.0.01.lo"].shape == (30, 3, 64)
    assert cal.tensors["k.pre.0.01a.hi"].shape == (30, 3, 64)          # Fisher-allocated
    assert cal.tensors["k.post.0.01m.lo"].shape == (30, 3, 64)         # one budget, all layers
    assert int(cal.tensors["v.0.01m.tails"].sum()) == round(0.01 * 3 * 64 * 30)  # 1% of values
    assert cal.tensors["v.0.01r.count"].shape == (30, 3, 1024)          # Hadamard-rotated values
    assert int(cal.tensors["v.0.01mr.tails"].sum()) == round(0.01 * 3 * 64 * 30)
    path = cal.save(tmp_path / "c.safetensors")
    again = Calibration.load(path, model)
    assert torch.equal(again.tensors["v.0.01.fisher"], cal.tensors["v.0.01.fisher"])
    tables = again.tables(4, method("nuq2-1%", levels_per="head"))      # per KV head
    assert tables.key_levels.shape == (3, 4) and tables.value_table.shape == (3, 4)
    assert (tables.key_hi >= tables.key_lo).all()
    assert cal.tensors["k.pre.0.01m.fisher"].shape == (30, 3, 1024)     # per-head histograms
    per_layer = again.tables(4, method("nuq2-1%"))                      # per layer (default)
    assert per_layer.key_levels.shape == (4,)
    # the layer's table is k-means over the heads' histograms summed
    summed = cal.tensors["k.pre.0.01m.fisher"][4].sum(0)
    assert torch.equal(per_layer.key_levels, kmeans_levels(summed, 2))
    assert not torch.equal(tables.key_levels[0], tables.key_levels[1])
    fim = cal.tensors["k.pre.fim"]                                      # keys' Fisher matrices
    assert fim.shape == (30, 3, 64, 64) and torch.allclose(fim, fim.transpose(-1, -2))
    u = again.tables(4, method("nuq2-1%")).key_feedback                 # its feedback factor
    assert u.shape == (3, 64, 64) and torch.equal(u, u.triu()) and (u.diagonal(0, 1, 2) > 0).all()


def test_bad_input_errors(model_tok, calib):
    model, tok = model_tok
    # a file from before per-head histograms: per-layer tables work, per-head ones say why not
    old = Calibration({k: (v.sum(1) if k.endswith((".count", ".fisher")) else v)
                       for k, v in calib.tensors.items()}, calib.settings)
    assert old.tables(0, method("nuq3-1%")).key_levels.shape == (8,)
    with pytest.raises(WorkbenchError, match="per-layer histograms only"):
        old.tables(0, method("nuq3-1%", levels_per="head"))
    with pytest.raises(WorkbenchError, match="levels_per"):
        method("nuq3-1%", levels_per="channel")
    with pytest.raises(WorkbenchError, match="value_rotation"):
        method("nuq3-1%", value_rotation="random")
    no_rot = Calibration({k: v for k, v in calib.tensors.items() if not k.startswith("v.0.01r")},
                         calib.settings)
    with pytest.raises(WorkbenchError, match="Hadamard-rotated"):
        no_rot.tables(0, method("nuq3-1%"))
    assert no_rot.tables(0, method("nuq3-1%", value_rotation="none")).key_lo is not None
    no_fim = Calibration({k: v for k, v in calib.tensors.items() if not k.endswith(".fim")},
                         calib.settings)                                 # before key feedback
    with pytest.raises(WorkbenchError, match="Fisher matrices of the keys.*nearest"):
        no_fim.tables(0, method("nuq3-1%"))
    assert no_fim.tables(0, method("nuq3-1%", key_rounding="nearest")).key_feedback is None
    with pytest.raises(WorkbenchError, match="key_rounding='feedback' needs per-channel"):
        method("kivi", 3, key_rounding="feedback")
    with pytest.raises(WorkbenchError, match="too short"):
        calibrate(model, ids=torch.zeros(2, 100, dtype=torch.long), progress=False)
    with pytest.raises(WorkbenchError, match="needs a calibration"):
        KVQuantCache(model, "nuq3-1%")
    other = Calibration(dict(calib.tensors), {**calib.settings, "model": {
        **calib.settings["model"], "model": "other", "layers": 32, "head_dim": 128}})
    with pytest.raises(WorkbenchError, match="made for model 'other'"):
        KVQuantCache(model, "nuq3-1%", other)
    with pytest.raises(WorkbenchError, match="outlier fractions"):
        KVQuantCache(model, replace(method("nuq3-1%"), outlier_fraction=0.05), calib)
    older = Calibration({k: v for k, v in calib.tensors.items() if not re.search(r"\dmr?\.", k)},
                        calib.settings)                                  # before "fisher-model"
    with pytest.raises(WorkbenchError, match="key_outliers='fisher-model'.*recalibrate"):
        KVQuantCache(model, "nuq3-1%", older)
    KVQuantCache(model, method("nuq3-1%", key_outliers="fisher"), older)  # older switch works
    with pytest.raises(WorkbenchError, match="value_outliers='fisher-model'.*recalibrate"):
        KVQuantCache(model, method("nuq3-1%", key_outliers="fisher",
                                   value_outliers="fisher-model"), older)
    with pytest.raises(WorkbenchError, match="keeps 0.015 of the keys.*key_outlier_share"):
        KVQuantCache(model, method("nuq3-1%", key_outlier_share=0.75), calib)  # file has 0, 1%
    # the shipped file has the value allocation: tails per layer, one total budget for the
    # model (1% of a token's value elements over all layers)
    tables = calib.tables(1, method("nuq3-1%", value_outliers="fisher-model"))
    assert tables.value_tails is not None and calib.tables(1, method("nuq3-1%")).value_tails is None
    assert int(calib.tensors["v.0.01m.tails"].sum()) == round(0.01 * 3 * 64 * calib.layers)
    # the checksum's last digits depend on the thread count; other shapes still refuse
    near = {**calib.settings["model"]}
    near["k_proj_checksum"] += 1e-3
    Calibration(dict(calib.tensors), {**calib.settings, "model": near}).check_model(model)
    with pytest.raises(WorkbenchError, match="No calibration file"):
        Calibration.load("/nonexistent/file.safetensors")

    class NoProj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].self_attn = torch.nn.Linear(4, 4)

    with pytest.raises(WorkbenchError, match="k_proj"):
        geometry(NoProj())
