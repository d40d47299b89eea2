"""Read the shape of any transformers model: no per-family files.

    shape = model_shape("llama-2-7b")                  # a built-in config with published sizes
    shape = model_shape(LlamaConfig(...))              # any transformers config
    shape = model_shape(model)                         # a loaded model (its real modules)
    shape = model_shape("llama-2-7b", num_key_value_heads=8)   # what-if: change a config field

How: the config is instantiated on PyTorch's `meta` device (no memory, no weights, well under a
second even for 70B), and the first transformer block is walked. Every `nn.Linear` (or GPT-2's
`Conv1D`) in it becomes one matrix multiply with its real in/out sizes, every `*Norm` module one
norm; the attention core (heads, KV heads, head size, sliding window) comes from the config. So
fused projections (GPT-2's `c_attn`, Phi-3's `qkv_proj`), gated MLPs, biases, GQA and tied
embeddings are picked up from the model itself, and a new family works if transformers has it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError

CONFIGS_PATH = Path(__file__).with_name("model_configs.json")
_ENCODER_SUFFIXES = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                     "ForQuestionAnswering", "ForPreTraining")
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class LinearShape:
    """One weight matrix of a block: y (tokens, out) = x (tokens, in) @ W (in, out) [+ b]."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str  # "attention" or "mlp"

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class NormShape:
    """One LayerNorm/RMSNorm over vectors of `size` elements."""

    name: str
    size: int
    rms: bool
    params: int


@dataclass(frozen=True)
class ModelShape:
    """Everything the roofline needs about a model; sizes are element counts, not bytes.

    linears/norms describe one transformer block (all blocks share them); `windows` gives
    (sliding window or None, number of blocks) pairs; `embeddings` lists lookup tables
    (name, rows, width) read one row per token; `lm_head` is None for encoders.
    """

    name: str
    model_type: str
    is_decoder: bool
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    tied_embeddings: bool
    rotary: bool
    gated_mlp: bool
    intermediate: int
    linears: tuple[LinearShape, ...]
    norms: tuple[NormShape, ...]
    outer_norms: tuple[NormShape, ...]
    embeddings: tuple[tuple[str, int, int], ...]
    lm_head: LinearShape | None
    windows: tuple[tuple[int | None, int], ...]
    params: int

    @property
    def layer_params(self) -> int:
        """Parameters of one block."""
        return sum(x.params for x in self.linears) + sum(n.params for n in self.norms)

    @property
    def embedding_params(self) -> int:
        """Parameters of the lookup tables (and of an untied LM head: it is an embedding too)."""
        untied = 0 if (self.lm_head is None or self.tied_embeddings) else self.lm_head.params
        return sum(r * d for _, r, d in self.embeddings) + untied

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params

    def kv_elements_per_token(self) -> int:
        """K and V elements stored per token over all blocks (ignoring sliding windows)."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def describe(self) -> dict:
        """Shape facts as a small dict (for printing)."""
        return {"model": self.name, "type": self.model_type,
                "kind": "decoder" if self.is_decoder else "encoder", "parameters": self.params,
                "layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "mlp": f"{'gated ' if self.gated_mlp else ''}{self.intermediate}",
                "vocab": self.vocab, "tied_embeddings": self.tied_embeddings,
                "sliding_window": next((w for w, _ in self.windows if w), None)}


@lru_cache(maxsize=1)
def _known() -> dict:
    return json.loads(CONFIGS_PATH.read_text())


def known_models() -> list[str]:
    """Names of the built-in configs (published sizes; see model_configs.json for sources)."""
    return list(_known())


def known_config(name: str, **overrides):
    """A transformers config with a known model's published sizes, plus any field overrides."""
    import transformers

    entry = _known().get(name.lower())
    if entry is None:
        raise WorkbenchError(f"No built-in config named {name!r}. Built-in: "
                             f"{', '.join(known_models())}. Or pass any transformers config, "
                             "a loaded model, or a local model folder.")
    config = getattr(transformers, entry["class"])(**{**entry["kwargs"], **overrides})
    config.name_or_path = name.lower()
    return config


def _resolve_config(model: str, overrides: dict):
    if model.lower() in _known():
        return known_config(model, **overrides)
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise WorkbenchError(f"No model folder at {model!r}. Give a built-in name "
                             f"({', '.join(known_models())}), a folder with a config.json, a "
                             "hub id like 'org/name', or a transformers config.")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else model)
    except (OSError, ValueError) as err:
        raise WorkbenchError(
            f"Unknown model {model!r}: not a built-in config ({', '.join(known_models())}), not a "
            "local folder with a config.json, and the Hugging Face hub could not provide its "
            f"config. Detail: {str(err).splitlines()[0]}") from None
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def is_decoder_config(config) -> bool:
    """Decoder (causal LM) or encoder (BERT-style), from `architectures` or the auto mappings."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(_DECODER_SUFFIXES):
            return True
        if arch.endswith(_ENCODER_SUFFIXES):
            return False
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return False
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or bool(getattr(config, "is_decoder", False))


def _check_supported(config) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise WorkbenchError(f"{config.model_type} is an encoder-decoder model; the roofline covers "
                             "decoder-only and encoder-only models. Analyze its parts separately.")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, key, None):
            raise WorkbenchError(f"{config.model_type} is a mixture of experts ({key}="
                                 f"{getattr(config, key)}); expert routing is not modelled yet.")


def _meta_model(config, decoder: bool):
    """The model for `config` on the meta device, trimmed to one block (fast at any size)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if getattr(small, "layer_types", None):
        small.layer_types = list(config.layer_types[:1])
    factory = AutoModelForCausalLM if decoder else AutoModel
    try:
        with torch.device("meta"):
            return factory.from_config(small), 1
    except Exception:  # some configs refuse one block: build them whole (still no memory)
        with torch.device("meta"):
            return factory.from_config(config), config.num_hidden_layers


def _windows(config) -> tuple[tuple[int | None, int], ...]:
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window and types:
        sliding = sum(t == "sliding_attention" for t in types)
        pairs = ((window, sliding), (None, layers - sliding))
        return tuple(p for p in pairs if p[1])
    if window and getattr(config, "use_sliding_window", True) is not False:
        return ((window, layers),)
    return ((None, layers),)


def _linear_dims(module) -> tuple[int, int] | None:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and w is not None and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])  # GPT-2's Conv1D stores W as (in, out)
    return None


def _norm_shape(name: str, module) -> NormShape | None:
    w = getattr(module, "weight", None)
    if "norm" not in type(module).__name__.lower() or w is None or w.dim() != 1:
        return None
    params = sum(p.numel() for p in module.parameters(recurse=False))
    return NormShape(name, int(w.shape[0]), "rms" in type(module).__name__.lower(), params)


def _shape_from_module(model, config, name: str, decoder: bool, built_layers: int) -> ModelShape:
    import torch.nn as nn

    layers = config.num_hidden_layers
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == built_layers and len(m)]
    if not found:
        raise WorkbenchError(f"Could not find the list of {built_layers} transformer blocks in "
                             f"{type(model).__name__}; this architecture is not supported.")
    blocks_name, blocks = found[0]
    linears, norms = [], []
    for sub, module in blocks[0].named_modules():
        dims = _linear_dims(module)
        if dims:
            group = "attention" if any(("attn" in p or "attention" in p)
                                       for p in sub.lower().split(".")) else "mlp"
            linears.append(LinearShape(sub, dims[0], dims[1], getattr(module, "bias", None)
                                       is not None, group))
        elif (norm := _norm_shape(sub, module)) is not None:
            norms.append(norm)
    hidden = config.hidden_size
    mlp = [x for x in linears if x.group == "mlp"]
    down = [x for x in mlp if x.out_features == hidden]
    if not mlp or not down:
        raise WorkbenchError(f"Could not find the MLP of {type(blocks[0]).__name__}.")
    intermediate = down[-1].in_features
    gated = sum(x.out_features for x in mlp if x.in_features == hidden) == 2 * intermediate

    inner = {id(m) for m in blocks.modules()}
    outer_norms, tables = [], []
    token_table = model.get_input_embeddings()
    for sub, module in model.named_modules():
        if id(module) in inner:
            continue
        if isinstance(module, nn.Embedding):
            tables.append((sub, module.num_embeddings, module.embedding_dim))
        elif (norm := _norm_shape(sub, module)) is not None:
            outer_norms.append(norm)
    tables.sort(key=lambda t: t[1] != token_table.num_embeddings)  # token table first
    lm_head = None
    out = model.get_output_embeddings() if decoder else None
    tied = False
    if out is not None:
        lm_head = LinearShape("lm_head", out.in_features, out.out_features, out.bias is not None,
                              "lm_head")
        tied = out.weight is token_table.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    layer_params = sum(p.numel() for p in blocks[0].parameters())
    params = sum(unique.values()) + (layers - built_layers) * layer_params
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "multi_query", False):
        kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    rotary = any("rotary" in type(m).__name__.lower() for m in model.modules())
    return ModelShape(
        name=name, model_type=config.model_type, is_decoder=decoder, layers=layers, hidden=hidden,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None), tied_embeddings=tied,
        rotary=rotary, gated_mlp=gated, intermediate=intermediate, linears=tuple(linears),
        norms=tuple(norms), outer_norms=tuple(outer_norms), embeddings=tuple(tables),
        lm_head=lm_head, windows=_windows(config), params=params)


def fuse_projections(shape: ModelShape) -> ModelShape:
    """The same model with parallel projections fused, as fast inference engines run it.

    Within each group (attention, MLP), consecutive matrices that read the same input (q, k, v;
    gate, up) become one matrix, except the group's last one (the output projection). Same
    FLOPs and bytes; fewer operations, so less per-op latency.
    """
    merged: list[LinearShape] = []
    for group in ("attention", "mlp"):
        lins = [x for x in shape.linears if x.group == group]
        run: list[LinearShape] = []
        for lin in lins[:-1]:
            if run and lin.in_features != run[0].in_features:
                merged.append(_merge(run))
                run = []
            run.append(lin)
        if run:
            merged.append(_merge(run))
        merged += lins[-1:]
    return replace(shape, linears=tuple(merged), name=shape.name + " (fused)")


def _merge(run: list[LinearShape]) -> LinearShape:
    if len(run) == 1:
        return run[0]
    name = "+".join(x.name.rsplit(".", 1)[-1] for x in run)
    prefix = run[0].name.rsplit(".", 1)[0] + "." if "." in run[0].name else ""
    return LinearShape(prefix + name, run[0].in_features, sum(x.out_features for x in run),
                       any(x.bias for x in run), run[0].group)


@lru_cache(maxsize=64)
def _shape_from_config_json(text: str, cls_name: str, name: str) -> ModelShape:
    import transformers

    config = getattr(transformers, cls_name).from_dict(json.loads(text))
    decoder = is_decoder_config(config)
    model, built = _meta_model(config, decoder)
    return _shape_from_module(model, config, name, decoder, built)


def model_shape(model, **overrides) -> ModelShape:
    """The `ModelShape` of a built-in name, local folder, hub id, config, or loaded model.

    overrides: config fields to change first (e.g. num_key_value_heads=8 for a GQA what-if).
    """
    import torch.nn as nn
    from transformers import PretrainedConfig

    if isinstance(model, ModelShape):
        if overrides:
            raise WorkbenchError("Overrides apply to configs; pass the config, not a ModelShape.")
        return model
    if isinstance(model, str):
        config = _resolve_config(model, overrides)
    elif isinstance(model, PretrainedConfig):
        config = copy.deepcopy(model)
        for k, v in overrides.items():
            setattr(config, k, v)
    elif isinstance(model, nn.Module) and hasattr(model, "config"):
        if overrides:
            raise WorkbenchError("Overrides need a config: pass model.config with overrides.")
        _check_supported(model.config)
        decoder = is_decoder_config(model.config)
        name = getattr(model.config, "name_or_path", "") or model.config.model_type
        return _shape_from_module(model, model.config, Path(name).name or name, decoder,
                                  model.config.num_hidden_layers)
    else:
        raise WorkbenchError(f"Cannot read a model shape from {type(model).__name__}: pass a name "
                             "like 'llama-2-7b', a transformers config, or a loaded model.")
    _check_supported(config)
    name = getattr(config, "name_or_path", "") or config.model_type
    shape = _shape_from_config_json(config.to_json_string(use_diff=False),
                                    type(config).__name__, Path(name).name or name)
    return replace(shape, name=Path(name).name or name)
