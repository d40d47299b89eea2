"""Model shapes from local configs of several families, checked against transformers itself."""

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

from workbench.errors import WorkbenchError
from workbench.roofline import fuse_projections, known_config, known_models, model_shape
from workbench.roofline.shapes import is_decoder_config

FAMILIES = {  # name: (decoder, kv_heads, gated MLP, tied embeddings, rotary)
    "smollm2-135m": (True, 3, True, True, True),
    "llama-3-8b": (True, 8, True, False, True),
    "qwen2-0.5b": (True, 2, True, True, True),
    "mistral-7b-v0.1": (True, 8, True, False, True),
    "phi-3-mini-4k": (True, 32, True, False, True),
    "gpt2": (True, 12, False, True, False),
    "bert-base": (False, 12, False, False, False),
}


def _meta_params(config) -> int:
    factory = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
    with torch.device("meta"):
        model = factory.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_shape_of_each_family_matches_transformers(name):
    config = known_config(name)
    shape = model_shape(config)
    decoder, kv_heads, gated, tied, rotary = FAMILIES[name]
    assert shape.params == _meta_params(config)        # the whole model, layer count included
    assert (shape.is_decoder, shape.kv_heads, shape.gated_mlp, shape.tied_embeddings,
            shape.rotary) == (decoder, kv_heads, gated, tied, rotary)
    assert shape.layers == config.num_hidden_layers
    assert (shape.lm_head is not None) == decoder


def test_published_sizes():
    billions = {n: model_shape(n).params / 1e9 for n in ("llama-2-7b", "llama-3-8b", "qwen2-7b",
                                                         "mistral-7b-v0.1", "gpt2", "bert-large")}
    assert billions["llama-2-7b"] == pytest.approx(6.74, abs=0.01)
    assert billions["llama-3-8b"] == pytest.approx(8.03, abs=0.01)
    assert billions["qwen2-7b"] == pytest.approx(7.62, abs=0.01)
    assert billions["mistral-7b-v0.1"] == pytest.approx(7.24, abs=0.01)
    assert billions["gpt2"] == pytest.approx(0.124, abs=0.001)
    assert billions["bert-large"] == pytest.approx(0.335, abs=0.001)


def test_loaded_model_reads_like_its_config():
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=200)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    from_model, from_config = model_shape(model), model_shape(config)
    assert from_model.params == from_config.params == sum(p.numel() for p in model.parameters())
    assert from_model.linears == from_config.linears
    assert any(x.bias for x in from_model.linears)      # Qwen2 has q/k/v biases


def test_overrides_and_fused_projections():
    gqa = model_shape("llama-2-7b", num_key_value_heads=8)
    assert gqa.kv_heads == 8 and gqa.params < model_shape("llama-2-7b").params
    fused = fuse_projections(model_shape("llama-2-7b"))
    assert [x.out_features for x in fused.linears] == [3 * 4096, 4096, 2 * 11008, 4096]
    assert fused.layer_params == model_shape("llama-2-7b").layer_params


def test_every_built_in_config_builds():
    for name in known_models():
        assert model_shape(name).params > 1e8


def test_clear_errors():
    with pytest.raises(WorkbenchError, match="Built-in"):
        known_config("llama-9")
    with pytest.raises(WorkbenchError, match="No model folder"):
        model_shape("./no/such/model")
    with pytest.raises(WorkbenchError, match="encoder-decoder"):
        model_shape(transformers.T5Config(num_layers=1, d_model=64, d_ff=128, num_heads=2))
    with pytest.raises(WorkbenchError, match="mixture of experts"):
        model_shape(transformers.MixtralConfig(num_hidden_layers=1, hidden_size=64,
                                               intermediate_size=128, num_attention_heads=4,
                                               num_key_value_heads=2))
    with pytest.raises(WorkbenchError, match="Cannot read"):
        model_shape(42)
