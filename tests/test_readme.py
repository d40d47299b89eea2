"""The README's "Apply a technique to your own model" example runs as written, on the embedded
model (the other blocks name a GPU or a user's own model folder)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_apply_a_technique_example_runs(capsys):
    from workbench.llm import LocalChat
    from workbench.models import load_model

    model, tokenizer = load_model()
    scope = {"model": model, "tokenizer": tokenizer, "LocalChat": LocalChat}
    exec(compile(_block("### Apply a technique to your own model"), "README.md", "exec"), scope)
    cache, sq, result = scope["cache"], scope["sq"], scope["result"]
    mem = cache.memory()               # 26 tokens: the exact first token (sink) weighs in
    assert mem["bytes_per_token"] < mem["fp16_bytes_per_token"] / 2
    assert 0 < sq.kept_fraction() <= 0.25 + 1e-6
    assert result.answer and result.seconds > 0
