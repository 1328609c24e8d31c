"""The grouped GEMMs' launch-shape policy (codegen/schedule.py), on the GPU autotuning lists: plain CPU, no kernels run."""

import pytest

from dsmoe_compiler.codegen import INTERPRETED

pytest.importorskip("triton")
if INTERPRETED:  # the interpreter swaps in one small tile; the policy is about the GPU lists
    pytest.skip("GPU autotuning lists only", allow_module_level=True)

from dsmoe_compiler.codegen import down_weighted, gate_up_glu, schedule  # noqa: E402


def _picked(kernel, rows, **constexprs):
    return schedule.prune_launch_shape(kernel.configs, {}, ROWS_BUCKET=rows, **constexprs)


@pytest.mark.skipif(schedule.PERSISTENT != "auto", reason="DSMOE_PERSISTENT forces one launch shape")
@pytest.mark.parametrize("rows", [128, 512, 1024])
def test_prefill_gate_up_persistent_only_when_stacked(rows):
    stacked = _picked(gate_up_glu.gate_up_glu_kernel, rows, STACKED=True)
    apart = _picked(gate_up_glu.gate_up_glu_kernel, rows, STACKED=False)
    prefill = lambda picked: [c for c in picked if schedule.is_prefill(c)]  # noqa: E731
    assert prefill(stacked) and all(c.kwargs["PERSISTENT"] for c in prefill(stacked))
    assert prefill(apart) and not any(c.kwargs["PERSISTENT"] for c in prefill(apart))
    tiles = lambda picked: sorted((c.kwargs["BLOCK_SIZE_M"], c.kwargs["BLOCK_SIZE_N"], c.kwargs["BLOCK_SIZE_K"],  # noqa: E731
                                   c.num_warps, c.num_stages) for c in prefill(picked))
    assert tiles(stacked) == tiles(apart)  # the same tiles, only the launch shape differs


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_decode_tiles_unchanged_by_the_operand(rows):
    """Decode tiles (one program per tile unless DSMOE_PERSISTENT=on) are the same whichever the operand."""
    stacked = _picked(gate_up_glu.gate_up_glu_kernel, rows, STACKED=True)
    apart = _picked(gate_up_glu.gate_up_glu_kernel, rows, STACKED=False)
    decode = lambda picked: [c for c in picked if not schedule.is_prefill(c)]  # noqa: E731
    assert decode(stacked) and decode(stacked) == decode(apart)


def test_down_keeps_one_launch_shape_per_tile():
    """The down GEMM lists each prefill tile once (persistent under "auto"): nothing for the prune to pick."""
    prefill = [c for c in down_weighted.down_weighted_kernel.configs if schedule.is_prefill(c)]
    keys = [(c.kwargs["BLOCK_SIZE_M"], c.kwargs["BLOCK_SIZE_N"], c.kwargs["BLOCK_SIZE_K"], c.num_warps, c.num_stages)
            for c in prefill]
    assert prefill and len(keys) == len(set(keys))


@pytest.mark.parametrize("rows", [1, 16, 512])
def test_fp32_gets_tiles_that_fit_the_shared_memory(rows, monkeypatch):
    """16-bit inputs keep the shipped tiles; 4-byte inputs get the ``wide`` prefill tiles, and only tiles whose
    pipeline buffers fit the GPU's shared memory (the H200's 227 KB here): the 16-bit prefill tiles asked for
    360 KB in fp32 (benchmarks/fp32_layer.py)."""
    import torch

    monkeypatch.setattr(schedule, "_shared_memory", lambda device: 232448)
    for kernel, operand, weight_tiles in ((gate_up_glu.gate_up_glu_kernel, "x_ptr", 2),
                                          (down_weighted.down_weighted_kernel, "h_ptr", 1)):
        args = {"ROWS_BUCKET": rows, "STACKED": True}
        narrow = schedule.prune_by_rows(kernel.configs, {operand: torch.empty(1, dtype=torch.bfloat16)}, **args)
        assert narrow == schedule.prune_by_rows(kernel.configs, {}, **args)  # what the policy tests above see
        assert not any(c.kwargs["WIDE"] for c in narrow)
        wide = schedule.prune_by_rows(kernel.configs, {operand: torch.empty(1)}, **args)
        assert wide and all(schedule._pipeline_bytes(c, 4, weight_tiles) <= 232448 for c in wide)
        if rows >= 64:
            assert all(c.kwargs["WIDE"] for c in wide)
