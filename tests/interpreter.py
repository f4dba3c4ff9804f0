"""What the tests of Triton kernels under the interpreter share: their pytest marks.

Triton reads TRITON_INTERPRET when it decorates the kernels, so these tests run in their own pytest process
(``TRITON_INTERPRET=1 python -m pytest -m interpreter``; ``make test`` does) and skip anywhere else.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

MARKS = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
        reason="needs triton and TRITON_INTERPRET=1 set before the kernels are imported (its own pytest process)",
    ),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy, on the lanes the kernels mask out
]
