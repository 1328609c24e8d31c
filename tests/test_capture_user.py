"""Spine: user-written MoEs (no transformers), dense models, unsupported routing, reports and dumps."""

import copy
import os

import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import graph_breaks
from models import DenseModel, ModuleListMoE, ThreeDMoE, UserBlockModel

import dsmoe_compiler
from dsmoe_compiler.capture.graph_utils import InputWritesUndone

EAGER_INNER = {"inner": "eager"}


def _run(model, x, options=EAGER_INNER):
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="dualsparse", options=options)(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    return dsmoe_compiler.last_report()


@pytest.mark.parametrize("kw", [{}, {"score": "sigmoid", "renormalize": False}, {"top_k": 3, "renormalize": False}])
def test_module_list_moe(kw):
    torch.manual_seed(0)
    report = _run(UserBlockModel(ModuleListMoE, **kw).eval(), torch.randn(2, 5, 32))
    assert [b.form for b in report.rewritten] == ["user ModuleList"] * 2, str(report)
    assert not report.left_alone
    assert graph_breaks() == ({}, {})


@pytest.mark.parametrize("renormalize", [False, True])
def test_three_d_weights_moe(renormalize):
    torch.manual_seed(1)
    report = _run(UserBlockModel(ThreeDMoE, renormalize=renormalize).eval(), torch.randn(3, 4, 32))
    assert [b.form for b in report.rewritten] == ["user 3-D weights"] * 2, str(report)
    assert all(("renorm" in b.variant) == renormalize for b in report.rewritten)
    assert graph_breaks() == ({}, {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("moe_cls, kw", [(ModuleListMoE, {}), (ThreeDMoE, {"renormalize": True}),
                                         (ThreeDMoE, {"renormalize": False})])
def test_user_moe_in_low_precision_is_captured(dtype, moe_cls, kw):
    """bf16/fp16 models: the candidate check allows rounding, yet still tells renormalised from not (before,
    it demanded fp32 agreement, so every bf16 user MoE was left alone)."""
    torch.manual_seed(5)
    model = UserBlockModel(moe_cls, hidden=64, **kw).eval().to(dtype)
    x = torch.randn(3, 50, 64, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, backend="dualsparse", options=EAGER_INNER)(x)
    report = dsmoe_compiler.last_report()
    assert len(report.rewritten) == 2, str(report)
    if "renormalize" in kw:
        assert all(("renorm" in b.variant) == kw["renormalize"] for b in report.rewritten)
    # per token: a rounding difference can flip a near-tie in the next layer's top-k for a token or two
    per_token = (got.double() - expected.double()).norm(dim=-1) / expected.double().norm(dim=-1)
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]  # bf16 keeps 8 bits of mantissa, fp16 11
    assert (per_token < tol).double().mean().item() >= 0.95, per_token.flatten().sort().values[-8:]


def test_input_writes_are_put_back_exactly():
    """What ``InputWritesUndone`` sees written into its inputs comes back bit for bit: ``index_copy_`` with a
    repeated index, ``setitem`` and an accumulating ``index_put_`` (their undo saves the indexed rows), ``add_``,
    ``out=``, a write through a slice; a tensor made inside the block is not its business, nor are inputs without a
    readable storage."""
    torch.manual_seed(6)
    cache, counter, buffer = torch.randn(2, 3, 10, 4), torch.zeros((), dtype=torch.long), torch.randn(5, 4)
    before = [t.clone() for t in (cache, counter, buffer)]
    with InputWritesUndone([cache, counter, buffer, torch.eye(2).to_sparse(), 7]):  # no storage to read: skipped
        cache.index_copy_(2, torch.tensor([7, 7, 2]), torch.randn(2, 3, 3, 4))
        cache[:, :, torch.tensor([1, 1])] = torch.randn(2, 3, 2, 4)
        cache.index_put_((torch.tensor([0]),), torch.randn(1, 3, 10, 4), accumulate=True)
        counter.add_(3)
        torch.mul(buffer, 2, out=buffer)
        buffer[1:3].zero_()
        made_here = torch.ones(3).add_(1)
        assert not torch.equal(cache, before[0]) and counter.item() == 3
    for now, then in zip((cache, counter, buffer), before):
        assert torch.equal(now, then)
    assert torch.equal(made_here, torch.full((3,), 2.0))


_WRITES = st.sampled_from(["index_copy_", "index_put_", "index_put_accumulate", "slice_mul_", "view_copy_",
                            "out_add", "fill_"])


@settings(max_examples=40, deadline=None)
@given(writes=st.lists(st.tuples(_WRITES, st.integers(0, 2**31 - 1)), min_size=1, max_size=8))
def test_any_sequence_of_input_writes_is_undone(writes):
    """Property: whatever sequence of writes (overlapping rows, repeated indices, views, ``out=``) lands in the
    inputs inside ``InputWritesUndone``, they are bit for bit as before on exit (newest undone first)."""
    cache, other = torch.randn(3, 6, 4), torch.randn(6, 4)
    before = (cache.clone(), other.clone())
    with InputWritesUndone([cache, other]):
        for kind, seed in writes:
            g = torch.Generator().manual_seed(seed)
            rows = torch.randint(0, 6, (3,), generator=g)
            values = torch.randn(3, 3, 4, generator=g)
            if kind == "index_copy_":
                cache.index_copy_(1, rows, values)
            elif kind.startswith("index_put_"):
                other.index_put_((rows,), values[0], accumulate=kind.endswith("accumulate"))
            elif kind == "slice_mul_":
                cache[:, 1:4].mul_(values[:, :3])
            elif kind == "view_copy_":
                other.view(4, 6)[1].copy_(values[0].flatten()[:6])
            elif kind == "out_add":
                torch.add(other, 1.5, out=other)
            else:
                cache[int(rows[0]) % 3].fill_(float(seed % 7))
    assert torch.equal(cache, before[0]) and torch.equal(other, before[1])


class _WritesItsState(torch.nn.Module):
    """A user MoE behind state written in place each call, as a static KV cache is: a step counter and a slot of
    memory indexed by it, which the next calls read."""

    def __init__(self):
        super().__init__()
        self.block = UserBlockModel(ThreeDMoE, renormalize=True)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory", torch.zeros(4, 32))

    def forward(self, x):
        self.memory.index_copy_(0, self.steps.view(1), x.mean(dim=(0, 1)).unsqueeze(0))
        self.steps.add_(1)
        return self.block(x + self.memory.sum(dim=0))


def test_a_check_run_leaves_written_inputs_as_they_were():
    """The user-MoE check runs the graph once more at compile time; what that run writes into the model's buffers
    is undone, so three compiled calls leave the same state and outputs as three eager ones (before the undo, the
    compiled model's counter read 2 after its first call and the memory slot 1 held a spurious write)."""
    torch.manual_seed(5)
    model = _WritesItsState().eval()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="dualsparse", options=EAGER_INNER)
    inputs = [torch.randn(2, 3, 32) for _ in range(3)]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
            assert twin.steps.item() == model.steps.item()
            torch.testing.assert_close(twin.memory, model.memory, rtol=0, atol=0)
    report = dsmoe_compiler.last_report()
    assert [b.form for b in report.rewritten] == ["user 3-D weights"] * 2, str(report)


def test_rewritten_graph_runs_the_moe_operator(monkeypatch):
    """The compiled model really calls dualsparse.moe (not the original ops): count the calls."""
    from dsmoe_compiler.codegen import reference

    calls = []
    original = reference.moe
    monkeypatch.setattr(reference, "moe", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(2)
    _run(UserBlockModel(ModuleListMoE).eval(), torch.randn(2, 3, 32))
    calls.clear()
    model = UserBlockModel(ModuleListMoE).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="dualsparse", options=EAGER_INNER)(torch.randn(2, 3, 32))
    # two blocks; the recogniser's verification runs the reference too (once per accepted block)
    assert len(calls) >= 2


def test_unsupported_routing_is_left_alone_with_one_warning():
    torch.manual_seed(3)
    model = UserBlockModel(ThreeDMoE, layers=1, weird=True).eval()
    with pytest.warns(UserWarning, match="left to the inner compiler") as record:
        report = _run(model, torch.randn(2, 4, 32))
    assert len([w for w in record if "dualsparse" in str(w.message)]) == 1
    assert not report.rewritten
    assert "no routing/expert interpretation" in report.left_alone[0].reason


def test_triton_kernels_asked_for_on_cpu_warn_once_and_run_the_reference(monkeypatch):
    """``kernels="triton"`` on CPU inputs (no interpreter) runs the reference and says so, once per graph."""
    from dsmoe_compiler import ops

    monkeypatch.setattr(ops, "INTERPRETED", False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="kernels='triton' needs CUDA inputs") as caught:
        _run(UserBlockModel(ThreeDMoE).eval(), torch.randn(2, 5, 32), {**EAGER_INNER, "kernels": "triton"})
    assert sum("needs CUDA inputs" in str(w.message) for w in caught) == 1


def test_dense_model_compiles_unchanged():
    torch.manual_seed(4)
    report = _run(DenseModel().eval(), torch.randn(2, 6, 32))
    assert not report.rewritten and not report.left_alone
    assert "0 MoE block(s) rewritten" in str(report)


def test_report_resets_with_dynamo():
    torch.manual_seed(5)
    _run(UserBlockModel(ModuleListMoE).eval(), torch.randn(1, 3, 32))
    assert dsmoe_compiler.last_report().rewritten
    torch._dynamo.reset()
    assert not dsmoe_compiler.last_report().rewritten


def test_report_table_names_blocks():
    torch.manual_seed(6)
    report = _run(UserBlockModel(ModuleListMoE).eval(), torch.randn(1, 3, 32))
    text = str(report)
    assert "moes.0" in text and "moes.1" in text and "softmax renorm" in text


def test_dump_dir_writes_graphs_and_pictures(tmp_path):
    torch.manual_seed(7)
    _run(UserBlockModel(ModuleListMoE).eval(), torch.randn(1, 3, 32), {"inner": "eager", "dump_dir": str(tmp_path)})
    names = sorted(os.listdir(tmp_path))
    assert any(n.endswith("captured.txt") for n in names) and any(n.endswith("after_capture.txt") for n in names)
    assert any(n.endswith(".png") for n in names)
    after = next(n for n in names if n.endswith("after_capture.txt"))
    assert "dualsparse.moe" in (tmp_path / after).read_text()


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALSPARSE_DUMP_DIR", str(tmp_path))
    torch.manual_seed(8)
    _run(DenseModel().eval(), torch.randn(1, 2, 32))
    assert any(n.endswith("captured.txt") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("options, key", [
    ({"kernels": "cuda"}, "kernels"), ({"inner": "tvm"}, "inner"), ({"partition": 0}, "partition"),
    ({"transform": "full"}, "transform"), ({"no_such_option": 1}, "no_such_option"),
])
def test_invalid_options_raise_value_error_naming_the_key(options, key):
    model = DenseModel().eval()
    with pytest.raises(ValueError, match=key):
        torch.compile(model, backend="dualsparse", options=options)(torch.randn(1, 2, 32))


def test_backend_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    assert "dualsparse" in torch._dynamo.list_backends()
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "dualsparse" in names


def test_a_checkout_root_imports_its_subpackages_without_the_editable_finder():
    """``python -m dsmoe_compiler demo`` from the repository's root after a normal ``pip install .``: the checkout's
    dsmoe_compiler/ is found first, and its subpackages (passes/, codegen/, runtime/ beside it) must resolve there.
    The editable install's finder, which maps them by name, is taken away to see what a normal install sees."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(root)!r}); import dsmoe_compiler.codegen.reference as r; "
            "import dsmoe_compiler.passes, dsmoe_compiler.runtime.ep; print(r.__file__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert pathlib.Path(done.stdout.strip()) == root / "codegen" / "reference.py"
