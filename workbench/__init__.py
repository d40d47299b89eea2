"""Workbench: learn and analyse efficient LLM inference and small-model agents.

The shared layers live here: `workbench.models` (load the embedded SmolLM2 or any Hugging Face
causal LM), `workbench.llm` (one chat interface over a local model or an OpenAI-compatible
endpoint), `workbench.data` (real data that installs from the package registry), and
`workbench.widgets` (plotly + ipywidgets conventions). Each paper has its own sub-package.
"""

from workbench.errors import WorkbenchError

__version__ = "0.1.0"
__all__ = ["WorkbenchError", "__version__"]
