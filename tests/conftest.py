"""Test-session setup shared by every test module.

Triton's interpreter is chosen when a kernel is *defined*, so TRITON_INTERPRET must be set before
any test module imports `kernels`: done here (conftest files load first) whenever no GPU is
present, so a single kernel test file also runs under plain `pytest`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
