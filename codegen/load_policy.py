"""Load-aware thresholds on the device: each rank's pairs per destination, and the built-in policies.

    pre[d]    = #{(token, sub-expert) pairs of this rank's tokens whose sub-expert rank d holds}   (loads_to)
    T[d, :]   = policy(load_d, T_max),  load_d = sum over source ranks s of gathered[s, d]       (policy_thresholds)

``runtime/ep.py`` all-gathers ``pre`` between the two launches. The torch versions, ``ep._loads_to`` and
``load_aware``'s policies (``ratio``, ``literal``, ``steep``, ``shift_centre``, ``uniform``), are the oracles;
they take about fifteen small ops, each ~25 µs of host time on the GPU machine's host
(``benchmarks/ep_nccl.py --host-profile``), where these are two launches. A policy a user wrote stays torch.

Both kernels run as one program: a few thousand to a few hundred thousand ids, and [W] / [W, W] loads.
"""

import torch
import triton
import triton.language as tl

from dsmoe_compiler.codegen.launch import launch

RULES = {"uniform": 0, "literal": 1, "steep": 2, "shift_centre": 3}
"""``load_aware.device_rule(policy)[0]`` → the kernel's POLICY code."""


@triton.jit
def loads_to_kernel(experts_ptr, owner_ptr, loads_ptr, n, world,
                    P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_W: tl.constexpr):
    ranks = tl.arange(0, BLOCK_W)
    total = tl.zeros([BLOCK_W], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < n
        expert = tl.load(experts_ptr + offs, mask=live, other=0)
        for p in tl.static_range(P):  # after a partial transformation expert e names sub-experts e P + p
            dest = tl.load(owner_ptr + expert * P + p, mask=live, other=-1)
            total += tl.sum((dest[:, None] == ranks[None, :]).to(tl.int32), axis=0)
    tl.store(loads_ptr + ranks, total.to(tl.int64), mask=ranks < world)


def loads_to(experts: torch.Tensor, owner: torch.Tensor, partition: int, world: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """[W] int64: pairs per destination rank of routed expert ids [T, K] (any integer dtype), each naming
    ``partition`` sub-experts e P + p whose ranks owner [E P] gives; ``ep._loads_to`` in one launch. ``out``: a
    [W] buffer to write (the tests pass a poisoned one)."""
    loads = torch.empty(world, dtype=torch.int64, device=experts.device) if out is None else out
    block_w = triton.next_power_of_2(world)
    launch(loads_to_kernel, (1,), (experts.contiguous(), owner.contiguous(), loads), (experts.numel(), world),
           dict(P=partition, BLOCK=max(16, 8192 // block_w), BLOCK_W=block_w))
    return loads


@triton.jit
def policy_thresholds_kernel(gathered_ptr, tmax_ptr, out_ptr, world, inv_world, alpha, band,
                             POLICY: tl.constexpr, OWN_BAND: tl.constexpr, TWO_T: tl.constexpr,
                             BLOCK_W: tl.constexpr):
    src = tl.arange(0, BLOCK_W)[:, None]
    dst = tl.arange(0, BLOCK_W)
    live = dst < world
    gathered = tl.load(gathered_ptr + src * world + dst[None, :], mask=(src < world) & live[None, :], other=0)
    loads = tl.sum(gathered, axis=0).to(tl.float32)  # int64 sums, then fp32, as load_aware's loads
    ideal = tl.sum(loads, axis=0) * inv_world  # mean = sum * fp32(1 / W), as torch's CUDA mean
    ratio = tl.where(ideal > 0, tl.math.div_rn(loads, tl.maximum(ideal, 1e-30)), 1.0)
    t_major = tl.load(tmax_ptr)
    t_minor = tl.load(tmax_ptr + 1)
    if POLICY == 0:  # uniform
        major = t_major + 0.0 * ratio
        minor = t_minor + 0.0 * ratio
    elif POLICY == 2:  # steep(alpha)
        factor = tl.minimum(tl.maximum(1.0 - alpha * (1.0 - ratio), 0.0), 1.0)
        major = t_major * factor
        minor = t_minor * factor
    elif POLICY == 3 and TWO_T:  # shift_centre(band): the centre scaled, the band kept
        half = (t_minor - t_major) / 2
        if not OWN_BAND:
            half = band
        centre = (t_major + t_minor) / 2 * tl.minimum(ratio, 1.0)
        major = tl.maximum(centre - half, 0.0)
        minor = centre + half
    else:  # literal (and shift_centre of a 1T block)
        major = t_major * tl.minimum(ratio, 1.0)
        minor = t_minor * tl.minimum(ratio, 1.0)
    tl.store(out_ptr + dst * 2, major, mask=live)
    tl.store(out_ptr + dst * 2 + 1, minor, mask=live)


def policy_thresholds(gathered: torch.Tensor, t_max: torch.Tensor, rule: tuple, mode: str,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """[W, 2] fp32 thresholds per destination rank from every source's pairs per destination gathered [W, W]
    and the block's maximum thresholds t_max [2] (fp32), by a built-in policy: rule = (name, alpha, band) from
    ``load_aware.device_rule`` (band None: the block's own); mode: the block's drop rule ("2t", "1t", ...).
    ``out``: a [W, 2] buffer to write."""
    world = gathered.shape[0]
    out = torch.empty(world, 2, dtype=torch.float32, device=gathered.device) if out is None else out
    name, alpha, band = rule
    launch(policy_thresholds_kernel, (1,), (gathered.contiguous(), t_max.float().contiguous(), out),
           (world, 1.0 / world, float(alpha), 0.0 if band is None else float(band)),
           dict(POLICY=RULES[name], OWN_BAND=band is None, TWO_T=mode == "2t", BLOCK_W=triton.next_power_of_2(world)))
    return out
