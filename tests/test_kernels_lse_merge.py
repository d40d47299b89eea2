"""merge_attention_partials: reference vs first principles, kernel vs reference, dispatch rules.

On a CPU the Triton kernel runs in Triton's interpreter, which must be chosen before triton is
imported: tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present (`make test` sets it
too). On a GPU machine the kernel tests run compiled, on CUDA tensors.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend
from kernels.lse_merge import (
    _lse_merge_kernel,
    choose_blocks,
    lse_merge_triton,
    merge_attention_partials,
    merge_attention_partials_reference,
)
from kernels.testing import (
    TEST_DEVICE,
    assert_all_written,
    assert_matches_reference,
    fresh_seed,
    poisoned_empty,
)
from kernels.testing import needs_triton as needs_triton_for
from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parents[1]
DEVICE = TEST_DEVICE
NEG_INF = float("-inf")
needs_triton = needs_triton_for(_lse_merge_kernel)


def attention(q, k, v, mask=None):
    """Plain attention with its log-sum-exp. q (..., q_len, d), k/v (..., kv, d)."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5          # (..., q_len, kv)
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)                             # (..., q_len), -inf if empty
    return torch.softmax(scores, dim=-1) @ v, lse                     # empty part: NaN output


def random_partials(lead, n, d, dtype, gen, empty_frac=0.25):
    """Partial outputs (lead, n, d) and lses (lead, n) with some empty (-inf, NaN output) parts
    and some rows where every part is empty."""
    o = torch.randn(*lead, n, d, generator=gen, dtype=torch.float32)
    lse = torch.randn(*lead, n, generator=gen) * 4.0 + 2.0
    empty = torch.rand(*lead, n, generator=gen) < empty_frac
    if len(lead) and lead[-1] > 2:
        empty[..., 1, :] = True                                       # every part empty
    lse = lse.masked_fill(empty, NEG_INF)
    o = o.masked_fill(empty[..., None], float("nan"))                 # must never be read
    return o.to(dtype).to(DEVICE), lse.to(DEVICE)


# --- reference against first principles -------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_reference_is_attention_over_all_keys(n):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    b, h, q_len, kv, d = 2, 3, 5, 23, 16
    q = torch.randn(b, h, q_len, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, kv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, kv, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, h, q_len, kv, generator=gen) < 0.7          # some keys masked per query
    mask[0, 0, 0] = False                                             # one query sees no key
    full, full_lse = attention(q, k, v, mask)

    cuts = sorted(torch.randint(0, kv + 1, (n - 1,), generator=gen).tolist())
    bounds = [0, *cuts, kv]                                           # a part may be empty
    parts = [attention(q, k[..., a:z, :], v[..., a:z, :], mask[..., a:z])
             for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
    outputs = torch.stack([o for o, _ in parts], dim=-2)              # (b, h, q_len, n, d)
    lses = torch.stack([lse for _, lse in parts], dim=-1)             # (b, h, q_len, n)
    merged, merged_lse = merge_attention_partials_reference(outputs, lses)

    seen = full_lse > NEG_INF
    assert merged_lse.dtype == torch.float64
    torch.testing.assert_close(merged[seen], full[seen], rtol=1e-12, atol=1e-12,
                               msg=f"seed {seed}")
    torch.testing.assert_close(merged_lse, full_lse, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    assert (merged[~seen] == 0).all() and not torch.isnan(merged).any()


def test_reference_all_empty_and_one_partial():
    o = torch.full((2, 3, 8), float("nan"))
    merged, lse = merge_attention_partials_reference(o, torch.full((2, 3), NEG_INF))
    assert (merged == 0).all() and torch.isneginf(lse).all()
    o1 = torch.randn(4, 1, 8)
    lse1 = torch.randn(4, 1)
    merged, lse = merge_attention_partials_reference(o1, lse1)
    torch.testing.assert_close(merged, o1[:, 0])
    torch.testing.assert_close(lse, lse1[:, 0])


# --- kernel against reference -----------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("lead,d", [((3, 5), 40), ((2, 3, 7), 64), ((1,), 17)])
def test_kernel_matches_reference(dtype, n, lead, d):
    seed = fresh_seed()
    outputs, lses = random_partials(lead, n, d, dtype, torch.Generator().manual_seed(seed))
    out = poisoned_empty(*lead, d, dtype=dtype, device=DEVICE)
    out_lse = poisoned_empty(*lead, dtype=torch.float32, device=DEVICE)
    got = merge_attention_partials(outputs, lses, backend="triton", out=out, out_lse=out_lse)
    assert got[0] is out and got[1] is out_lse
    assert_all_written(out, "merged")
    assert_all_written(out_lse, "lse")
    assert_matches_reference(None, merge_attention_partials_reference, (outputs, lses),
                             kernel_out=got, names=("merged", "lse"), context=f"(seed {seed})")


@needs_triton
@pytest.mark.parametrize("lead,n,d", [((37,), 37, 40), ((2, 32), 8, 128), ((300,), 2, 64)])
def test_kernel_with_gpu_blocks(lead, n, d):
    """The GPU's block choice (several head_dim chunks per row, loops over partial chunks, one row
    per program) under the interpreter, on shapes that exercise each."""
    seed = fresh_seed()
    outputs, lses = random_partials(lead, n, d, torch.bfloat16, torch.Generator().manual_seed(seed))
    rows = outputs.reshape(-1, n, d)
    out = poisoned_empty(rows.shape[0], d, dtype=torch.bfloat16, device=DEVICE)
    out_lse = poisoned_empty(rows.shape[0], dtype=torch.float32, device=DEVICE)
    blocks = choose_blocks(rows.shape[0], n, d, interpreted=False)
    if n > 32:
        blocks = (blocks[0], 16, blocks[2], blocks[3])                # 3 trips over the partials
    lse_merge_triton(rows, lses.reshape(-1, n), out, out_lse, blocks=blocks)
    assert_all_written(out, "merged")
    assert_all_written(out_lse, "lse")
    assert_matches_reference(None, merge_attention_partials_reference,
                             (rows, lses.reshape(-1, n)), kernel_out=(out, out_lse),
                             context=f"(seed {seed}, blocks {blocks})")


@needs_triton
def test_kernel_strided_and_list_inputs():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    # split-KV layout with the partial axis first: (n, batch, heads, d), merged via a view
    outputs = torch.randn(3, 2, 5, 48, generator=gen).to(DEVICE)
    lses = torch.randn(5, 2, 3, generator=gen).to(DEVICE).permute(2, 1, 0)   # (n, b, h) strided
    lses[1, 0, 2] = NEG_INF
    o_view, l_view = outputs.movedim(0, -2), lses.movedim(0, -1)      # (b, h, n, d), (b, h, n)
    merged, lse = merge_attention_partials(o_view, l_view, backend="triton")
    ref, ref_lse = merge_attention_partials_reference(o_view, l_view)
    torch.testing.assert_close(merged, ref, msg=f"seed {seed}")
    torch.testing.assert_close(lse, ref_lse, msg=f"seed {seed}")
    # prefix + user-token attention: two separate results, given as lists
    merged2, lse2 = merge_attention_partials(list(outputs), list(lses), backend="triton")
    torch.testing.assert_close(merged2, ref)
    torch.testing.assert_close(lse2, ref_lse)


@needs_triton
def test_kernel_empty_rows_tensor():
    merged, lse = merge_attention_partials(torch.randn(0, 3, 8, device=DEVICE),
                                           torch.randn(0, 3, device=DEVICE), backend="triton")
    assert merged.shape == (0, 8) and lse.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernel_on_gpu(dtype):
    seed = fresh_seed()
    outputs, lses = random_partials((4, 32), 16, 128, dtype, torch.Generator().manual_seed(seed))
    got = merge_attention_partials(outputs.cuda(), lses.cuda())
    assert_matches_reference(None, merge_attention_partials_reference,
                             (outputs.cuda(), lses.cuda()), kernel_out=got,
                             context=f"(seed {seed})")


# --- dispatch rules ---------------------------------------------------------------------------


def _plain_function():
    """Stands in for a kernel compiled for a GPU (not the interpreter)."""


def test_dispatch_rules():
    x = torch.randn(2, 3)
    with pytest.raises(WorkbenchError, match="backend must be one of"):
        pick_backend("cuda", [x], _lse_merge_kernel)
    assert pick_backend("torch", [x], _lse_merge_kernel) == "torch"
    # triton not installed: auto falls back, an explicit request explains
    assert pick_backend("auto", [x], None) == "torch"
    with pytest.raises(WorkbenchError, match="not installed"):
        pick_backend("triton", [x], None)
    if HAS_TRITON:
        # CPU tensors with a kernel compiled for the GPU: auto -> reference, triton -> how to fix
        assert pick_backend("auto", [x], _plain_function) == "torch"
        with pytest.raises(WorkbenchError, match="TRITON_INTERPRET=1"):
            pick_backend("triton", [x], _plain_function)
        # a dtype the kernel does not take
        dt = (torch.float32,)
        assert pick_backend("auto", [x.double()], _plain_function, supported_dtypes=dt) == "torch"
        with pytest.raises(WorkbenchError, match="float64"):
            pick_backend("triton", [x.double()], _plain_function, supported_dtypes=dt)
    # devices: mixed is an error; one without a Triton backend falls back
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(WorkbenchError, match="one device"):
        pick_backend("auto", [x, meta], _lse_merge_kernel)
    if HAS_TRITON:
        assert pick_backend("auto", [meta], _plain_function) == "torch"
    if HAS_TRITON and is_interpreted(_lse_merge_kernel):  # interpreter: only when asked by name
        assert pick_backend("auto", [x], _lse_merge_kernel) == "torch"
        assert pick_backend("triton", [x], _lse_merge_kernel) == "triton"
    if torch.cuda.is_available() and HAS_TRITON:
        assert pick_backend("auto", [x.cuda()], _lse_merge_kernel) == "triton"


def test_public_errors_and_torch_backend():
    o, lse = torch.randn(2, 4, 8), torch.randn(2, 4)
    with pytest.raises(WorkbenchError, match="same leading dims"):
        merge_attention_partials(o, lse[:, :3])
    with pytest.raises(WorkbenchError, match="out must be"):
        merge_attention_partials(o, lse, out=torch.empty(2, 7))
    out = poisoned_empty(2, 8)
    out_lse = poisoned_empty(2)
    merged, merged_lse = merge_attention_partials(o, lse, backend="torch", out=out,
                                                  out_lse=out_lse)
    assert merged is out and merged_lse is out_lse
    assert_all_written(out)
    ref, ref_lse = merge_attention_partials_reference(o, lse)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_lse, ref_lse)
    # float64 is not a kernel dtype: auto uses the reference (and keeps float64)
    m64, l64 = merge_attention_partials(o.double(), lse.double())
    assert m64.dtype == l64.dtype == torch.float64


_SUBPROCESS_CHECK = """
import sys, torch
{prelude}
from kernels import merge_attention_partials
from workbench.errors import WorkbenchError
o, lse = torch.randn(3, 2, 8), torch.randn(3, 2)
merge_attention_partials(o, lse)          # auto: the reference
try:
    merge_attention_partials(o, lse, backend="triton")
except WorkbenchError as e:
    print("ERROR:", e)
"""


@pytest.mark.parametrize("case", ["no triton", "no interpreter"])
def test_import_without_triton_or_interpreter(case):
    """`import kernels` works without triton; CPU without the interpreter uses the reference, and
    asking for triton says what to do."""
    prelude = "sys.modules['triton'] = None" if case == "no triton" else ""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK.format(prelude=prelude)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = "not installed" if case == "no triton" else "TRITON_INTERPRET=1"
    assert "ERROR:" in done.stdout and expected in done.stdout, done.stdout
