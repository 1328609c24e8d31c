"""Probe: the EP row exchange by NVSHMEM's device-side all_to_all_vdev against NCCL with host split sizes (GPU only).

    torchrun --nproc-per-node N benchmarks/symm_a2a.py --json results/symm_a2a_N.json

Our EP dispatch (``runtime.ep``) moves each rank's sorted rows to their ranks by NCCL ``all_to_all_single``,
whose split sizes must be Python ints: the host waits for the device once per call (``ep.splits``), which
makes the layer host-bound at 4096 tokens per rank (README, Multi-GPU benchmark). PyTorch's symmetric-memory
``all_to_all_vdev`` takes the split sizes as a device tensor and writes the received sizes and offsets on the
device, so nothing waits. This script asks whether it is available here, whether it moves the same rows, and
what it costs, before any of it is wired into the operator:

- nccl: the split sizes exchanged by ``all_to_all_single`` on the device, read by the host (``tolist``), then
  the rows by ``all_to_all_single`` (what the operator does, with an all-gather in place of the first call);
- vdev: ``torch.ops.symm_mem.all_to_all_vdev`` on symmetric buffers sized for the worst case.

Rows: TOKENS x TOPK per rank, hidden 2048 bf16, destination shares drawn around 1/W. Each timed call is preceded
by a barrier and timed by CUDA events (median of REPS); "x8 queued" times 8 calls issued back to back with one
event pair, where a host wait per call shows. The first call of each method is checked against the other.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (device README)
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(6 << 30))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def draw_splits(rows: int, world: int, gen: torch.Generator) -> torch.Tensor:
    share = torch.rand(world, generator=gen) + 0.5
    splits = (share / share.sum() * rows).floor().long()
    splits[0] += rows - splits.sum()
    return splits


def nccl_exchange(rows_in, splits, hidden):
    recv_splits = torch.empty_like(splits)
    dist.all_to_all_single(recv_splits, splits)
    send, recv = splits.tolist(), recv_splits.tolist()  # the host waits here
    out = rows_in.new_empty(sum(recv), hidden)
    dist.all_to_all_single(out, rows_in[: sum(send)], recv, send)
    return out, recv_splits


def vdev_exchange(inp, out, splits_buf, out_meta, group_name):
    """(received sizes, their offsets) on the device; the schema of torch 2.11 and 2.13."""
    torch.ops.symm_mem.all_to_all_vdev(inp, out, splits_buf, out_meta, group_name)
    return out_meta[0], out_meta[1]


def timed(fn, device, reps, queued=1):
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(queued):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / queued)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch.distributed._symmetric_memory as symm_mem

    backend_error = None
    try:  # before the process group and CUDA exist (torch 2.11 refused it after them)
        symm_mem.set_backend("NVSHMEM")
    except Exception as e:  # noqa: BLE001
        backend_error = f"{type(e).__name__}: {e}"
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    torch.empty(1, device=device)

    info = {"torch": torch.__version__, "world": world, "nvshmem_available": None, "schema": None,
            "set_backend_error": backend_error}
    try:
        info["nvshmem_available"] = bool(symm_mem.is_nvshmem_available())
        group_name = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group_name)
        info["schema"] = str(torch.ops.symm_mem.all_to_all_vdev.default._schema)
    except Exception as e:  # noqa: BLE001  (a probe: report what is missing and stop)
        info["error"] = f"{type(e).__name__}: {e}"
        if rank == 0:
            print(json.dumps(info, indent=1))
        dist.destroy_process_group()
        return

    results = []
    for tokens in args.tokens:
        rows = tokens * args.topk
        gen = torch.Generator().manual_seed(1000 * rank + tokens)
        splits = draw_splits(rows, world, gen).to(device)
        rows_in = torch.randn(rows, args.hidden, device=device, dtype=torch.bfloat16, generator=None)
        row = {"tokens_per_rank": tokens, "rows_per_rank": rows, "world": world}
        try:
            inp = symm_mem.empty(rows, args.hidden, dtype=torch.bfloat16, device=device)
            out = symm_mem.empty(world * rows, args.hidden, dtype=torch.bfloat16, device=device)
            inp.copy_(rows_in)
            out.fill_(float("nan"))  # poison: rows the exchange does not write stay NaN
            splits_buf = symm_mem.empty(world, dtype=torch.int64, device=device)
            splits_buf.copy_(splits)
            out_meta = symm_mem.empty(2, world, dtype=torch.int64, device=device)
            symm_mem.rendezvous(inp, group=group_name)
            info["backend"] = symm_mem.get_backend(device)
            symm_mem.rendezvous(out, group=group_name)
            symm_mem.rendezvous(splits_buf, group=group_name)
            symm_mem.rendezvous(out_meta, group=group_name)

            ref, ref_splits = nccl_exchange(rows_in, splits, args.hidden)
            got_splits, got_offsets = vdev_exchange(inp, out, splits_buf, out_meta, group_name)
            torch.cuda.synchronize(device)
            same_splits = torch.equal(got_splits.cpu(), ref_splits.cpu())
            got = torch.cat([out[o: o + n] for o, n in zip(got_offsets.tolist(), got_splits.tolist())])
            row["same_splits"] = same_splits
            row["same_rows"] = bool(got.shape == ref.shape and torch.equal(got, ref))
            run_nccl = functools.partial(nccl_exchange, rows_in, splits, args.hidden)
            run_vdev = functools.partial(vdev_exchange, inp, out, splits_buf, out_meta, group_name)
            row["nccl_ms"] = timed(run_nccl, device, args.reps)
            row["vdev_ms"] = timed(run_vdev, device, args.reps)
            row["nccl_x8_ms"] = timed(run_nccl, device, max(args.reps // 3, 3), queued=8)
            row["vdev_x8_ms"] = timed(run_vdev, device, max(args.reps // 3, 3), queued=8)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        results.append(gathered)

    if rank == 0:
        info["rows"] = results
        if args.json:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(info, f, indent=1)
        print(json.dumps({k: v for k, v in info.items() if k != "rows"}, indent=1))
        print("| world | tokens/rank | rows same | nccl ms | vdev ms | nccl ms (x8 queued) | vdev ms (x8 queued) |")
        print("|---|---|---|---|---|---|---|")
        for per_rank in results:
            r0 = per_rank[0]
            if "error" in r0:
                print(f"| {world} | {r0['tokens_per_rank']} | error: {r0['error']} |")
                continue
            same = all(r.get("same_rows") and r.get("same_splits") for r in per_rank)
            slow = {k: max(r[k] for r in per_rank) for k in ("nccl_ms", "vdev_ms", "nccl_x8_ms", "vdev_x8_ms")}
            print(f"| {world} | {r0['tokens_per_rank']} | {same} | {slow['nccl_ms']:.3f} | {slow['vdev_ms']:.3f} | "
                  f"{slow['nccl_x8_ms']:.3f} | {slow['vdev_x8_ms']:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
