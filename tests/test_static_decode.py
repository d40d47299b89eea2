"""StaticDecoder (static KV cache, CUDA-graph steps on a GPU) against the plain dynamic-cache
loop, on a small random Llama with GQA: same logits, prefix reuse, clear errors, and a decode step
without graph breaks (what a CUDA graph needs: no host sync, no data-dependent Python)."""

from __future__ import annotations

import inspect

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.static_decode import StaticDecoder


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def dynamic_greedy(model, ids: list[int], steps: int) -> list[torch.Tensor]:
    """Logits after the prompt and after each greedy token, with transformers' DynamicCache."""
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        logits = [out.logits[0, -1]]
        for _ in range(steps):
            token = int(logits[-1].argmax())
            out = model(input_ids=torch.tensor([[token]]), use_cache=True,
                        **{arg: getattr(out, arg)})
            logits.append(out.logits[0, -1])
    return logits


def static_greedy(dec: StaticDecoder, ids: list[int], steps: int) -> list[torch.Tensor]:
    logits = [dec.prefill(ids)]
    for _ in range(steps):
        logits.append(dec.step(int(logits[-1].argmax())))
    return logits


def test_static_decoder_equals_dynamic_cache_and_reuses_prefixes(model):
    dec = StaticDecoder(model, max_len=64)
    prompts = ([5, 17, 3, 99, 42, 7], [5, 17, 3, 99, 11, 12], [5, 17, 3, 99, 11, 12, 40, 41])
    for ids in prompts:            # the 2nd shares 4 ids with the 1st; the 3rd extends the 2nd
        held = list(dec.tokens)
        got, want = static_greedy(dec, ids, 6), dynamic_greedy(model, ids, 6)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-5)
        assert dec.tokens[:len(ids)] == ids and len(dec.tokens) == len(ids) + 6
        assert held == [] or held[:4] == ids[:4]


def test_static_decoder_errors(model):
    dec = StaticDecoder(model, max_len=8)
    with pytest.raises(WorkbenchError, match="before prefill"):
        dec.step(1)
    with pytest.raises(WorkbenchError, match="between 1 and 7"):
        dec.prefill(list(range(8)))
    dec.prefill([1, 2, 3, 4, 5, 6, 7])
    dec.step(1)
    with pytest.raises(WorkbenchError, match="full"):
        dec.step(2)


def test_decode_step_has_no_graph_break(model):
    """torch.compile(fullgraph=True) refuses host syncs and data-dependent Python: a decode step
    that compiles whole can also be captured as a CUDA graph."""
    dec = StaticDecoder(model, max_len=32)
    dec.prefill([3, 4, 5])
    dec._ids.fill_(9)
    dec._pos.fill_(len(dec.tokens))
    step = torch.compile(lambda: dec._forward(dec._ids, dec._pos), fullgraph=True,
                         backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(step()[0].float(), dynamic_greedy(model, [3, 4, 5, 9], 0)[0])


def test_failed_capture_falls_back_to_eager(model, monkeypatch):
    """A model whose step cannot be captured still decodes (eagerly), with a warning."""
    dec = StaticDecoder(model, max_len=32, use_graph=True)

    def refuse():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(dec, "_capture", refuse)
    first = dec.prefill([3, 4, 5])
    with pytest.warns(UserWarning, match="capture failed"):
        got = dec.step(int(first.argmax()))
    assert not dec.use_graph
    want = dynamic_greedy(model, [3, 4, 5], 1)[1]
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
