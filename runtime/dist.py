"""Process groups and collectives for expert parallelism, on ``torch.distributed`` (NCCL on GPU, gloo on CPU).

No transport of our own: the dispatch and combine exchanges are the functional collective
``all_to_all_single`` (``torch.distributed._functional_collectives``), which stays an FX node the
inner compiler can see; the small count exchanges inside the EP operators are plain c10d calls.

Failure behaviour: a collective whose peer is dead or never arrives fails when the process group's
timeout expires (``init(timeout_s=...)``, default 60 s, ``DUALSPARSE_DIST_TIMEOUT`` in seconds);
a peer that exits closes its gloo/NCCL connections, which fails the survivors' next collective at
once. Under NCCL the collectives are asynchronous: the process group's watchdog aborts a
collective that outlives the timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default), which
ends the process with an error rather than a hang (not exercised here: no multi-GPU machine was
lent; the gloo paths are tested). ``check_same`` compares a fingerprint (spec, expert ranges, world size) across the ranks of a
group before the first exchange, so ranks compiled differently raise instead of exchanging
mismatched buffers; on gloo it starts with a ``monitored_barrier`` that names the missing ranks.
"""

from __future__ import annotations

import datetime
import hashlib
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

DEFAULT_TIMEOUT_S = 60.0


def default_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("DUALSPARSE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def init(backend: str | None = None, timeout_s: float | None = None, **kwargs) -> dist.ProcessGroup:
    """Initialise the default process group from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    backend defaults to NCCL when CUDA is available, else gloo. Under NCCL the rank's device is set to
    LOCAL_RANK. Returns the default group.
    """
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else default_timeout()
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return dist.group.WORLD


def resolve_group(option) -> dist.ProcessGroup:
    """The process group named by the ``expert_parallel`` option: True -> the default group, or the group itself."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("dualsparse: option 'expert_parallel' needs torch.distributed initialised "
                           "(dsmoe_compiler.runtime.dist.init() or torch.distributed.init_process_group)")
    if option is True:
        return dist.group.WORLD
    if isinstance(option, dist.ProcessGroup):
        return option
    raise ValueError(f"dualsparse: option 'expert_parallel' must be True or a ProcessGroup, got {option!r}")


def group_name(group: dist.ProcessGroup) -> str:
    return group.group_name


def group_by_name(name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def expert_ranges(num_subs: int, world: int) -> list[int]:
    """Boundaries [b_0 = 0, b_1, ..., b_W = num_subs]: rank r holds sub-experts b_r .. b_{r+1} - 1.

    Contiguous and balanced to one sub-expert. With a partial transformation (P sub-experts per
    expert) the E*P sub-experts can be spread over up to E*P ranks (S-ETP).
    """
    if num_subs < world:
        raise ValueError(f"dualsparse: {num_subs} (sub-)experts cannot be spread over {world} ranks; "
                         "raise option 'partition' (S-ETP: E*P sub-experts over up to E*P ranks)")
    return [(r * num_subs) // world for r in range(world + 1)]


def local_expert_range(num_experts: int, partition: int, rank: int, world: int) -> tuple[int, int]:
    """(first, last + 1): the experts overlapping rank's sub-experts ``expert_ranges(E*P, W)[rank:rank+2]``.

    With P > 1 a rank may own only some sub-experts of its first and last expert (S-ETP); it keeps
    those experts whole (neighbouring ranks then both hold the shared expert)."""
    b = expert_ranges(num_experts * partition, world)
    return b[rank] // partition, (b[rank + 1] - 1) // partition + 1


SHARD_ATTRS = ("dualsparse_num_experts", "dualsparse_expert_offset")
"""Set on a sharded experts module: the global expert count and the first expert held (read by the capture)."""


def _refuse_eager(module, args):
    from dsmoe_compiler.capture import transformers_hf
    from dsmoe_compiler.runtime.calibrate import expert_tensors

    if transformers_hf._depth == 0:  # not inside a model compiled with dualsparse
        held = expert_tensors(module)["down"].shape[0]
        raise RuntimeError(f"dualsparse: {type(module).__name__} holds only experts {module.dualsparse_expert_offset}.."
                           f"{module.dualsparse_expert_offset + held - 1} of "
                           f"{module.dualsparse_num_experts} (shard_experts_); run the model through torch.compile("
                           "model, backend='dualsparse', options={'expert_parallel': group})")


def shard_experts_(model: torch.nn.Module, group: dist.ProcessGroup | None = None, partition: int = 1
                   ) -> dict[str, tuple[int, int, int]]:
    """Keep only this rank's experts in every transformers experts module of ``model``, in place.

    For each module with fused ``gate_up_proj`` / ``down_proj`` (and biases) that the capture can
    describe, or with experts of their own (``transformers_hf.EXPERT_SHARDERS``: DBRX's 2-D weights, JetMoE's block),
    the parameters are replaced by copies of the experts ``local_expert_range(E, partition, rank, W)`` of
    ``group`` (default: the default group) and the old ones are released: parameter memory drops to about
    1/W of the experts (plus router, attention, shared experts, which stay whole). The module records the
    global E and its first expert (``SHARD_ATTRS``); the capture reads
    them, so ``torch.compile(model, backend="dualsparse", options={"expert_parallel": group,
    "partition": partition})`` runs it and gives the unsharded model's outputs. Use the same group and
    partition for sharding and compiling (checked when compiling). Any other way of running the
    sharded model (eager, another backend, dualsparse without expert_parallel) raises instead of
    computing with the wrong experts. Not supported on a sharded model: ``reconstruct_`` / option
    'plan' (apply the plan before sharding) and calibration.

    Returns {module name: (E, first, last + 1)}. Peak memory is still the whole model while it is
    loaded (``from_pretrained`` on every rank, then shard).
    """
    from dsmoe_compiler.capture.transformers_hf import EXPERT_SHARDERS, describe_experts
    from dsmoe_compiler.runtime.calibrate import expert_tensors

    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("dualsparse: shard_experts_ needs torch.distributed initialised (dist.init())")
        group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    done = {}
    for name, module in model.named_modules():
        sharder = EXPERT_SHARDERS.get(type(module).__name__)  # experts with weights of their own (DBRX, JetMoE)
        if sharder is None and not (isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
                                    and isinstance(getattr(module, "down_proj", None), torch.Tensor)):
            continue
        if hasattr(module, SHARD_ATTRS[0]):
            raise ValueError(f"dualsparse: experts module {name!r} is already sharded")
        described = describe_experts(module)
        if isinstance(described, str):
            raise ValueError(f"dualsparse: cannot shard experts module {name!r}: {described}")
        # the routed experts: LongCat-Flash's gate_up_proj also holds rows for its zero-computation experts, which
        # no expert uses (sliced away with the other ranks' experts)
        E = expert_tensors(module)["down"].shape[0]
        first, last = local_expert_range(E, partition, rank, world)
        done[name] = (E, first, last)
        whole = (first, last) == (0, E) and (sharder is not None or module.gate_up_proj.shape[0] == E)
        if whole:  # one rank: nothing to drop
            continue
        if sharder is not None:
            sharder(module, first, last)
        else:
            keep_rows_(module, ("gate_up_proj", "down_proj")
                       + (("gate_up_proj_bias", "down_proj_bias") if described.has_bias else ()), first, last)
        setattr(module, SHARD_ATTRS[0], E)
        setattr(module, SHARD_ATTRS[1], first)
        module.register_forward_pre_hook(_refuse_eager)
    if not done:
        raise ValueError("dualsparse: shard_experts_ found no experts module it can shard (transformers' "
                         "gate_up_proj/down_proj, or DBRX's or JetMoE's)")
    return done


def keep_rows_(module, names, lo: int, hi: int) -> None:
    """Replace each tensor ``names`` of module by a copy of its rows lo .. hi - 1 (a Parameter stays one), so that the
    whole tensor can be freed: experts of 3-D weights and [E, n] biases, or an expert's rows of DBRX's 2-D ones."""
    with torch.no_grad():
        for attr in names:
            old = getattr(module, attr)
            local = old.detach()[lo:hi].clone()
            setattr(module, attr, torch.nn.Parameter(local, requires_grad=old.requires_grad)
                    if isinstance(old, torch.nn.Parameter) else local)
            del old


# ---- collectives --------------------------------------------------------------------------------
def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], name: str) -> torch.Tensor:
    """Functional ``all_to_all_single`` (rows of x split by ``input_splits``) followed by its wait."""
    return funcol.wait_tensor(torch.ops._c10d_functional.all_to_all_single(x, output_splits, input_splits, name))


def all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[W, *t.shape]: every rank's t (blocking c10d call; used inside the opaque EP operators). The c10d call
    took 40-90 µs of host time on 2 x H200, the functional collective with its wait 75-156 µs
    (``all_gather_functional``; ``benchmarks/ep_nccl.py --host-profile``, docs/ep-experiments.md, ninth session)."""
    world = dist.get_world_size(group)
    flat = t.contiguous().view(-1)
    out = flat.new_empty(world * flat.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, flat, group=group)
    return out.view(world, *t.shape)


def all_gather_functional(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``all_gather_rows`` through the functional collective and its wait (for ``ep_nccl.py``'s host times)."""
    world = dist.get_world_size(group)
    out = torch.ops._c10d_functional.all_gather_into_tensor(t.contiguous().view(-1), world, group_name(group))
    return funcol.wait_tensor(out).view(world, *t.shape)


def fingerprint(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def check_same(text: str, group: dist.ProcessGroup, what: str, timeout: datetime.timedelta | None = None) -> None:
    """Raise on every rank if ``text`` differs between the ranks of ``group`` (fails by the group's timeout
    if a rank never arrives)."""
    if dist.get_backend(group) == "gloo":
        dist.monitored_barrier(group=group, timeout=timeout or default_timeout(), wait_all_ranks=True)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([fingerprint(text)], dtype=torch.int64, device=device)
    every = all_gather_rows(mine, group).view(-1).tolist()
    if len(set(every)) != 1:
        ranks = dist.get_process_group_ranks(group)
        odd = [ranks[i] for i, v in enumerate(every) if v != every[dist.get_rank(group)]]
        raise RuntimeError(f"dualsparse: {what} differs between ranks of the expert-parallel group "
                           f"(rank {dist.get_rank()} disagrees with ranks {odd}); compile the same model "
                           "with the same options on every rank")
