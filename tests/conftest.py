import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernel cases' subprocesses: a third faster (see the module)
    import warnings

    import interpreter_patch

    if not interpreter_patch.install():
        warnings.warn("interpreter_patch: Triton's interpreter internals changed; the kernel cases run unpatched (slower)")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (README: pytest -n 2): no oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with an empty dynamo cache, empty counters and an empty dualsparse report."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def fp32_matmul_precision(setting: str):
    """torch's fp32 matmul setting (``torch.backends.cuda.matmul.fp32_precision``: "ieee", "tf32") inside, put back
    after: what the kernels' ``dispatch.dot_precision`` reads."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = setting
    try:
        yield
    finally:
        matmul.fp32_precision = before


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def graph_breaks():
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"]), dict(counters["unimplemented"])


def drop_runs(model, ids, mode: str, threshold: float) -> dict:
    """The same model compiled with kernels "reference" and "triton" and the same drop thresholds: each
    run's logits and measured drop rate (keys "reference", "triton", "reference_rate", "triton_rate")."""
    import dsmoe_compiler

    outs = {}
    for kernels in ("reference", "triton"):
        torch._dynamo.reset()
        opts = {"kernels": kernels, "inner": "eager", "drop": mode, "threshold": threshold, "stats": True}
        with torch.no_grad():
            outs[kernels] = torch.compile(model, backend="dualsparse", options=opts)(ids).logits
        outs[kernels + "_rate"] = dsmoe_compiler.drop_stats()["overall"]["drop_rate"]
    return outs


# The files that take longest, longest first (seconds of a local `-n 2` run, twenty-fifth session: test_kernels 479,
# test_capture_given 295, test_expert_parallel 245, test_capture_hf 232, test_ep_sharded 212, test_kernels_variants
# 133). With `--dist loadfile --no-loadscope-reorder` (README) the two workers take files in this order, so no long file
# is left for the end while the other worker idles; xdist's own order, by number of tests per file, put
# test_kernels_variants (2 tests, 133 s) last.
LONGEST_FIRST = ("test_kernels.py", "test_capture_given.py", "test_expert_parallel.py", "test_capture_hf.py",
                 "test_ep_sharded.py", "test_kernels_variants.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
