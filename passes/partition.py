"""Expert partition: split every expert into P sub-experts of intermediate/P neurons (paper §3.1-3.2).

Pattern (a block as captured, P == 1)::

    y = dualsparse.moe(x, params, spec)                   # spec.partition == 1

Replacement::

    y = dualsparse.moe(x, params, spec')                  # spec'.partition == P, spec'.transform == T

Only the spec string changes; ``params`` are the same tensors. Sub-expert s = e*P + p is neuron group
p of expert e (neurons p*c .. (p+1)*c - 1, c = I/P), read by ``reference.sub_expert_weights`` as a
strided view of the model's own parameters: no weight is copied or modified.

Equivalence preserved: ``reference.moe(x, params, spec') == reference.moe(x, params, spec)`` up to
floating-point summation order, because a GLU expert is separable per neuron,
f_e(x) = sum_p f_{e,p}(x) (paper Eq. 10), and the down bias is carried by p == 0 only.

- ``transform="partial"`` (paper Eq. 12-13): the router is untouched; after top-k the k indices
  become the k*P sub-expert indices [i1*P .. iK*P, i1*P+1 .., .., iK*P+P-1] and the k weights are
  tiled P times. Exact for every routing (it acts after top-k and reuses the final weights), ties
  in top-k included: whatever top-k chose is what gets split.
- ``transform="complete"`` (paper Eq. 7-11): router rows repeated P times (logits l_{e,p} = l_e),
  top-(k*P), per-expert score bias repeated (and divided by P under softmax, so that the selection
  key (s_e + b_e)/P keeps its order), group-limited routing with groups P times larger (group score
  "top2_sum" over the 2P best copies = P times the original). Every copy of a selected expert
  receives the weight w'_e given by ``copy_weight`` below; the output is restored by multiplying
  the weights by ``complete_scale``, which ``derive_complete_scale`` solves for with sympy so that
  complete_scale * w'_e == w_e identically:

      softmax                       w'_e = s_e / P                               scale P
      softmax + renormalise         w'_e = (s_e/P) / (sum_K P*s_j/P + eps)       scale P, eps unchanged
      sigmoid                       w'_e = s_e                                   scale 1
      sigmoid + renormalise         w'_e = s_e / (sum_K P*s_j + eps')            scale P, eps' = P*eps
      softmax after top-k (GPT-OSS) w'_e = exp(l_e) / sum_K P*exp(l_j)           scale P

  We scale the scores (``complete_scale``) rather than W2 (the paper's choice): W2 * P would need
  either a scaled copy of every down projection (P-independent extra memory equal to all of W2) or
  an in-place change of the model's own weights, which would make the uncompiled model (and any
  other compile of it) wrong. Scaling the k*P weights costs k*P multiplications per token.

Ties in top-k: partial is exact with ties. Complete is exact when ties are only between the P
copies of one expert (they are selected together); when two *different* original experts tie at
the k-th boundary, top-(k*P) over their 2P equal copies may keep a mix of both experts' copies,
so the output can differ from the original (which keeps one whole expert). Ties exactly at that
boundary need equal logits, which random data does not produce; a degenerate router (all logits
equal) does, see ``test_ties_partial_exact``.

Proven by tests/test_partition.py: ``test_partial_equals_original`` and
``test_complete_equals_original`` (hypothesis, random E, k, P, sizes, tokens incl. 0 and 1, softmax /
sigmoid, renormalisation, score after top-k, score bias, groups, biases, shared experts),
``test_reverse_partial_restores_ir``, ``test_scale_derivation``, and ``test_transformers_models``
(OLMoE, Mixtral, Qwen3-MoE, DeepSeek-V3, GPT-OSS compiled with P in {2, 4}), and
``test_sub_experts_share_storage_with_parameters`` (no copies).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx as fx

from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.ir import MoESpec

MOE = torch.ops.dualsparse.moe.default


# ---- the complete transformation's scale, derived ---------------------------------------------------
def copy_weight(score_func: str, renormalize: bool, score_after_topk: bool, copies, eps, k: int = 3):
    """Sympy model of the routing weight of expert 0 (selected, with experts 0..k-1; expert k not selected).

    ``copies`` is 1 for the original router and P for the complete transformation (router rows
    repeated P times: every sum over experts becomes a sum over P equal copies). Symbols x_j stand for
    exp(l_j) (softmax) or sigmoid(l_j) (sigmoid), both positive.
    """
    import sympy as sp

    x = sp.symbols(f"x0:{k + 1}", positive=True)
    if score_after_topk and score_func == "softmax":  # softmax over the k*copies selected logits
        return x[0] / sum(copies * x[j] for j in range(k))
    if score_func == "softmax":  # softmax over all E*copies logits: copies share the mass of one expert
        s = [x[j] / sum(copies * x[i] for i in range(k + 1)) for j in range(k + 1)]
    else:  # sigmoid of a repeated logit is the same value (also after top-k: Llama-4)
        s = list(x)
    if renormalize:  # divide by the sum of the k*copies selected weights
        return s[0] / (sum(copies * s[j] for j in range(k)) + eps)
    return s[0]


@functools.lru_cache(maxsize=None)
def _scale_symbolic(score_func: str, renormalize: bool, score_after_topk: bool):
    """(scale(P), eps factor(P)) as sympy expressions: scale * w'(P, eps_factor*eps) == w(1, eps) identically."""
    import sympy as sp

    P, scale, alpha = sp.symbols("P scale alpha", positive=True)
    eps = sp.Symbol("eps", nonnegative=True)
    original = copy_weight(score_func, renormalize, score_after_topk, 1, eps)
    transformed = copy_weight(score_func, renormalize, score_after_topk, P, alpha * eps)
    residual = sp.numer(sp.together(scale * transformed - original))
    variables = sorted(residual.free_symbols - {P, scale, alpha}, key=str)
    coefficients = sp.Poly(sp.expand(residual), *variables).coeffs()  # zero for all x, eps
    solutions = sp.solve(coefficients, [scale, alpha], dict=True)
    if len(solutions) != 1:
        raise AssertionError(f"no unique complete-transformation scale for {score_func}, renorm={renormalize}")
    solution = solutions[0]
    return solution[scale], solution.get(alpha, sp.Integer(1)), P


@functools.lru_cache(maxsize=None)
def derive_complete_scale(score_func: str, renormalize: bool, score_after_topk: bool, P: int) -> tuple[float, float]:
    """(complete_scale, renorm_eps factor) restoring the original weights after the complete transformation."""
    scale, eps_factor, p = _scale_symbolic(score_func, renormalize, score_after_topk)
    return float(scale.subs(p, P)), float(eps_factor.subs(p, P))


# ---- spec rewrites ----------------------------------------------------------------------------------
def partition_spec(spec: MoESpec, P: int, transform: str) -> MoESpec:
    """The spec of the block with every expert split into P sub-experts (see the module docstring)."""
    if spec.partition != 1:
        raise ValueError(f"dualsparse: block {spec.name!r} is already partitioned (P={spec.partition})")
    if P < 1 or spec.intermediate % P:
        raise ValueError(f"dualsparse: option 'partition'={P} must divide the intermediate size "
                         f"{spec.intermediate} of MoE block {spec.name!r}")
    if transform not in ("partial", "complete"):
        raise ValueError(f"dualsparse: option 'transform' must be 'partial' or 'complete', got {transform!r}")
    if transform == "partial":
        return spec.replace(partition=P, transform="partial", complete_scale=1.0)
    r = spec.routing
    unrepeatable = {"sparsemixer": "its router is PhiMoE's sparsemixer",  # rounds we cannot rescale on repeated rows
                    "given": "its routing is computed by the graph, not by a router the operator can repeat"}
    if r.score_func in unrepeatable:
        raise ValueError(f"dualsparse: option 'transform'='complete' cannot partition MoE block {spec.name!r}: "
                         f"{unrepeatable[r.score_func]}; use transform='partial'")
    scale, eps_factor = derive_complete_scale(r.score_func, r.renormalize, r.score_after_topk, P)
    # the denominator scales by eps_factor, so its floor does too: max(f*D, f*m) = f*max(D, m)
    routing = dataclasses.replace(r, renorm_eps=r.renorm_eps * eps_factor, renorm_min=r.renorm_min * eps_factor)
    return spec.replace(partition=P, transform="complete", complete_scale=scale, routing=routing)


def reverse_partial(spec: MoESpec) -> MoESpec:
    """Undo a partial transformation: the router was never touched, so partition=1 is the original IR."""
    if spec.transform != "partial":
        raise ValueError(f"dualsparse: reverse_partial needs a partially transformed block, got {spec.transform!r}")
    return spec.replace(partition=1, transform="partial", complete_scale=1.0)


# ---- the pass ---------------------------------------------------------------------------------------
def partition_pass(gm: fx.GraphModule, options, report) -> bool:
    """Set partition=P and the transform on every ``dualsparse.moe`` node; bumps counters["partition"]."""
    P, transform = options.partition, options.transform
    if P == 1:
        return False
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not MOE:
            continue
        spec = parse_spec(node.args[2])
        if spec.partition == P and spec.transform == transform:
            continue
        new = partition_spec(spec, P, transform)
        node.args = (node.args[0], node.args[1], new.to_json(), *node.args[3:])
        for entry in report.rewritten:  # the report's routing column shows "P=..(transform)"
            if entry.name == spec.name and entry.variant == spec.variant:
                entry.variant = new.variant
        report.counters["partition"] += 1
        changed = True
    return changed
