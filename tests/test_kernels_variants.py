"""The kernel cases of test_kernels.py under Triton's interpreter with weights through plain pointer loads, and with
persistent programs (``test_kernels.run_under_interpreter``). A file of their own, so that ``--dist loadfile`` can run
them beside the descriptor run, the suite's longest test."""

import pytest

from dsmoe_compiler.codegen import INTERPRETED

pytest.importorskip("triton")
from test_kernels import run_under_interpreter  # noqa: E402


@pytest.mark.skipif(INTERPRETED, reason="this is a launcher")
@pytest.mark.parametrize("variant", ["pointers", "persistent"])
def test_kernels_under_interpreter(variant):
    run_under_interpreter(variant)
