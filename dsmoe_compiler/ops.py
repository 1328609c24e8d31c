"""The MoE operator and the capture markers, as ``torch.library`` custom ops.

- ``dualsparse::moe(x, params, spec, impl)``: one whole MoE block. ``spec`` is ``MoESpec.to_json()``;
  ``params`` the tensors named by ``spec.slots``; ``impl`` picks the kernels ("reference" | "grouped" | "triton";
  "grouped": the reference with its experts as grouped products on the CPU, ``codegen/cpu_grouped.py``).
- ``dualsparse::route`` and ``dualsparse::experts``: what the transformers router and experts modules
  become while a model compiled with ``dualsparse`` is traced (``capture/transformers_hf.py``); the
  backend fuses each pair into one ``moe`` node. Each is exact on its own, so an unfused marker is
  never a wrong answer.
- ``dualsparse::left_alone(x, reason)``: identity that carries into the graph why a block was not
  captured, so the backend can report it; the backend removes it.

Fake implementations make the ops opaque leaves for dynamo, AOT autograd and inductor, dynamic
shapes included.
"""

from __future__ import annotations

import torch

from dsmoe_compiler.codegen import INTERPRETED, cpu_grouped, reference
from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.runtime import state


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def drop_state(spec):
    """(thresholds, stats) of a dropping block, looked up on every call so new thresholds need no recompile."""
    if spec.drop.mode == "none":
        return None, None
    block = state.lookup(spec.drop.key)
    if block is None:
        raise RuntimeError(f"dualsparse: no run-time state for block {spec.name!r}; was torch._dynamo.reset() "
                           "called without recompiling?")
    return block.thresholds, block.stats


def refuse_sharded(spec) -> None:
    """A model sharded by ``runtime.dist.shard_experts_`` holds only some experts: only the EP operators run it."""
    if spec.experts.local_experts:
        raise RuntimeError(f"dualsparse: MoE block {spec.name!r} holds only experts {spec.experts.expert_offset}.."
                           f"{spec.experts.expert_offset + spec.experts.local_experts - 1} of {spec.num_experts} "
                           "(sharded by shard_experts_); compile it with options={'expert_parallel': group}")


def run_moe(x, params, spec_json, impl="reference"):
    spec = parse_spec(spec_json)
    refuse_sharded(spec)
    thresholds, stats = drop_state(spec)
    if impl == "triton" and (x.is_cuda or INTERPRETED):
        from dsmoe_compiler.codegen.dispatch import moe_triton  # imported lazily: triton is optional on CPU

        return moe_triton(flat(x), params, spec, thresholds=thresholds, stats=stats).view_as(x)
    routed = cpu_grouped.experts if impl == "grouped" else None
    return reference.moe(flat(x), params, spec, thresholds, stats, routed=routed).view_as(x)


# The hot operator is registered through torch.library.Library rather than @custom_op: the custom_op
# wrapper's Python dispatch (autograd wrapper, aliasing checks) costs ~20 us per call on this CPU and
# ~0.1 ms on the H100 host (benchmarks/moe_host.py), once per MoE layer per step; an inference-only
# operator with a CompositeExplicitAutograd kernel costs ~6 us. Its outputs never alias its inputs.
_LIB = torch.library.Library("dualsparse", "DEF")
_LIB.define("moe(Tensor x, Tensor[] params, str spec, str impl='reference') -> Tensor")
_LIB.impl("moe", run_moe, "CompositeExplicitAutograd")


@torch.library.register_fake("dualsparse::moe")
def _(x, params, spec, impl="reference"):
    return torch.empty_like(x)


moe = torch.ops.dualsparse.moe


@torch.library.custom_op("dualsparse::route", mutates_args=())
def route(x: torch.Tensor, params: list[torch.Tensor], spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, weights, index = reference.route(flat(x), params, parse_spec(spec))
    return logits, weights, index


@route.register_fake
def _(x, params, spec):
    s = parse_spec(spec)
    tokens = x.numel() // x.shape[-1]
    r = s.routing
    logits = x.new_empty(tokens, s.num_experts, dtype=torch.float32 if r.logits_fp32 else x.dtype)
    weights = x.new_empty(tokens, s.top_k, dtype=torch.float32 if r.weights_fp32 else x.dtype)
    return logits, weights, x.new_empty(tokens, s.top_k, dtype=torch.long)


@torch.library.custom_op("dualsparse::experts", mutates_args=())
def experts(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, params: list[torch.Tensor],
            spec: str) -> torch.Tensor:
    refuse_sharded(parse_spec(spec))
    return reference.experts(x, index, weights, params, parse_spec(spec))


@experts.register_fake
def _(x, index, weights, params, spec):
    return torch.empty_like(x)


@torch.library.custom_op("dualsparse::left_alone", mutates_args=())
def left_alone(x: torch.Tensor, reason: str) -> torch.Tensor:
    return x.clone()


@left_alone.register_fake
def _(x, reason):
    return torch.empty_like(x)
