"""nbval settings: which outputs are compared when the notebooks run under `make test`.

Compared: plain-text outputs and errors (after notebooks/sanitize.cfg masks addresses, timings
and dates). Not compared: HTML, JavaScript, plotly JSON and widget views (they carry random ids
and are re-rendered each run), and stderr (progress bars, warnings).
Cells whose numbers depend on the machine start with `# NBVAL_IGNORE_OUTPUT`; cells that check
a claim start with `# CHECK:` and assert it, printing nothing, so they fail only if the claim
stops holding.
"""

import os

os.environ.setdefault("WORKBENCH_STATIC_FIGURES", "1")


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += (
            "text/html",
            "text/markdown",
            "application/javascript",
            "application/vnd.plotly.v1+json",
            "application/vnd.jupyter.widget-view+json",
            "image/png",
            "stderr",
        )
