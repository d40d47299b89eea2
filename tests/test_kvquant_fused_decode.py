"""KVQuant's fused decode inside model.generate (`workbench.kvquant.attend.fused_decode`) and the
growing block-CSR it reads (`workbench.kvquant.fused.GrowingPack`), on the embedded model."""

import pytest
import torch

from kernels.kvquant_decode import _kvq_decode_kernel
from kernels.testing import fresh_seed
from kernels.testing import needs_triton as needs_triton_for
from workbench.errors import WorkbenchError
from workbench.kvquant import KVQuantCache, forward_with_cache, fused_decode, load_calibration
from workbench.kvquant.fused import GrowingPack, pack
from workbench.kvquant.levels import nf_levels
from workbench.kvquant.methods import method
from workbench.kvquant.quantize import LayerTables, quantize


@pytest.fixture(scope="module")
def model_tok():
    from workbench.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def calib(model_tok):
    return load_calibration(model_tok[0])


@pytest.fixture(scope="module")
def prompt(model_tok):
    from workbench.data import text_chunks

    return text_chunks(model_tok[1], 256, 1, "python_docs")[:, :90]    # real text


def test_growing_pack_equals_pack_of_the_whole():
    """Chunks appended as a cache appends them (a prefill, then single tokens across block
    boundaries): the growing block-CSR equals the one sorted from the whole layer."""
    gen = torch.Generator().manual_seed(fresh_seed())
    b, h, d, block = 2, 3, 32, 32
    spec = method("kvquant", 3, outlier_fraction=0.05, sink_tokens=1, levels="nf", q_norm=False)
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


def test_fused_decode_generates_the_same_tokens(model_tok, calib, prompt):
    """generate inside fused_decode (PyTorch reference of the kernel on this CPU): the same
    greedy tokens and, step by step, the same logits as the cache's dequantized path."""
    model, tok = model_tok
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = model.generate(prompt, past_key_values=KVQuantCache(model, "nuq3-1%", calib), **kw)
        cache = KVQuantCache(model, "nuq3-1%", calib)
        with fused_decode(model, cache) as state:
            fused = model.generate(prompt, past_key_values=cache, **kw)
    assert torch.equal(plain, fused)
    assert state.fused_steps == 9 * model.config.num_hidden_layers     # every decode step
    assert model.config._attn_implementation != "workbench_attention"   # switched back
    assert cache.layers[0].growing is None
    # logits of single decode steps against the dequantized path
    caches = [KVQuantCache(model, "nuq3-1%", calib) for _ in range(2)]
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


@needs_triton_for(_kvq_decode_kernel)
def test_fused_decode_runs_the_triton_kernel(model_tok, calib, prompt):
    """One decode step through the Triton kernel (interpreter on CPU) matches the reference."""
    model = model_tok[0]
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
