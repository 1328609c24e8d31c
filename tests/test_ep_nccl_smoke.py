"""Smoke run of benchmarks/ep_nccl.py (issue 9) with 2 gloo processes on tiny shapes: it runs, and its numbers add up."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ep_nccl_benchmark_runs_on_gloo(tmp_path):
    out = tmp_path / "ep.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUALSPARSE_DIST_TIMEOUT": "20"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_port()), os.path.join(ROOT, "benchmarks", "ep_nccl.py"), "--device", "cpu", "--tiny",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("| olmoe | skewed | 64 |"), "the table must come last"
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["world"] == 2 and meta["backend"] == "gloo"
    assert meta["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert len(rows) == 2 * 2 * 2 * 4  # shapes x routings x token counts x variants
    by = {}
    for r in rows:
        K = meta["shapes"][r["shape"]]["K"]
        assert sum(r["load_before"]) == 2 * r["tokens_per_rank"] * K * r["partition"], r  # every pair, both ranks
        assert len(r["moe_ms_per_rank"]) == len(r["dispatch_ms_per_rank"]) == 2
        assert all(t > 0 for t in r["moe_ms_per_rank"] + r["dispatch_ms_per_rank"] + r["combine_ms_per_rank"])
        by[(r["shape"], r["routing"], r["tokens_per_rank"], r["variant"].split(" (")[0])] = r
    for (shape, routing, tokens, variant), r in by.items():
        if variant.startswith("none"):
            assert r["drop_rate"] == 0 and r["load_after"] == r["load_before"]
        else:
            assert 0 < r["drop_rate"] < 1, r
        if variant == "2T load-aware":  # literal: thresholds T * min(r, 1) never above the uniform ones
            uni = by[(shape, routing, tokens, "2T uniform")]
            assert r["drop_rate"] <= uni["drop_rate"] + 1e-12
            assert all(a >= b for a, b in zip(r["load_after"], uni["load_after"]))
    skew = by[("olmoe", "skewed", 64, "none")]
    assert skew["load_before"][0] > 1.2 * skew["load_before"][1], "skewed routing must load the first rank most"
    assert "dsmoe-tiny" in by[("olmoe", "realistic", 64, "none")]["routing_source"] or \
        not os.path.exists(os.path.join(ROOT, "models", "dsmoe-tiny", "metrics.json"))


def test_ab_summary_pairs_each_switched_row_with_the_one_before():
    """``ep_nccl.ab_summary``: an --ab run's rows alternate default / switched per variant and round; the summary
    pairs them (never across configurations), takes each side's median and counts the default's wins."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import ep_nccl
    finally:
        sys.path.pop(0)

    def row(variant, ms, tokens=64):
        return dict(shape="olmoe", routing="skewed", tokens_per_rank=tokens, variant=variant, moe_ms_per_rank=[ms, ms - 1])

    rows = [row("none", 2.0), row("none x", 3.0), row("2T", 5.0), row("2T x", 4.0),
            row("none", 2.2), row("none x", 2.1), row("2T", 4.0), row("2T x", 4.5),
            row("none", 1.0), row("none x", 9.0, tokens=32)]  # a switched row of another configuration: not paired
    summary, text = ep_nccl.ab_summary(rows, " x")
    by = {r["variant"]: r for r in summary}
    assert set(by) == {"none", "2T"}
    assert by["none"]["pairs"] == [(2.0, 3.0), (2.2, 2.1)] and by["none"]["default_faster"] == 1
    assert by["none"]["default_ms"] == 2.1 and by["none"]["switched_ms"] == 2.55
    assert by["2T"]["default_faster"] == 1 and by["2T"]["default_ms"] == 4.5
    assert text.splitlines()[0].startswith("| shape |") and "| 1/2 |" in text
