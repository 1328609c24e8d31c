"""Routers written as plain ops in front of a transformers experts marker become one ``dualsparse.route`` call.

``transformers_hf`` patches the routers it knows by class (or by identical code). Many models write their own:
sigmoid scores with a correction bias passed in as an argument (MiniMax-M2, HY-V3, AFMoE, LFM2-MoE), fp32 softmax
with a bias held by a sub-module and a clamped renormalisation (Ernie-4.5), top-k of the scores' values (Flint,
Lara), a router of its own input with a per-expert scale (Gemma-4). Their experts still reach the graph as a
``dualsparse.experts`` marker; this pass reads the router in front of it from the graph itself.

Pattern (casts allowed between any two steps; ``b``, ``s``: graph inputs of E elements)::

    logits  = linear(x_r, W[, c])                     # x_r: the experts' input up to views, or any [T, H] tensor
    scores  = softmax(logits) | sigmoid(logits)
    index   = topk(scores [+ b], k)[1]
    weights = gather(scores, index) | topk(scores, k)[0]
    weights = [s[index] *] [scale *] (weights [/ (sum(weights) [+ eps] | clamp(sum(weights), min=m))])
    # or GPT-OSS's form: values, index = topk(logits, k); weights = softmax(values)
    y = dualsparse.experts(x, index, weights, ...)

Replacement::

    r = dualsparse.route(x_r, [W, (c), (b), (s)], spec)   # spec: the RoutingSpec read off the pattern
    y = dualsparse.experts(x, r[2], r[1], ...)             # then fused by ``fuse_markers``

Equivalence: ``reference.route`` computes each step of the pattern in the same dtypes (``logits_fp32``,
``scores_fp32``, ``weights_fp32`` are read from the graph's example values). As a second guard, the parsed spec
must reproduce the graph's own index sets and weights on its example inputs before anything is rewritten; a
router that matches no pattern, or whose spec does not reproduce it, keeps its ops and the markers stay (exact).
Tests: ``tests/test_capture_route_graph.py`` (each pattern on a hand-written router, copies of the real models'
routers, and mutations that must not be captured).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from dsmoe_compiler.capture.fuse_markers import EXPERTS, ROUTE, ROUTE_REASON, _is, _route_output
from dsmoe_compiler.capture.graph_utils import (CASTS, LINEARS, VIEWS, example_value, is_call, recorded_values,
                                                same_base, strip, topk_of)
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import MoESpec, RoutingSpec

_DIVS = (operator.truediv, operator.itruediv, torch.div, torch.true_divide)


class NotARouter(Exception):
    """The ops in front of the experts do not match the pattern; the message says where."""


def _strip(node, also=frozenset()):
    """Skip casts (and the ``also`` methods) in front of a node."""
    return strip(node, CASTS | also)


def _arg(node: fx.Node, position: int, name: str, default=None):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _last_dim(node: fx.Node, position: int) -> bool:
    dim = _arg(node, position, "dim", -1)
    return dim in (-1, 1)


def _score_func(node) -> str | None:
    if is_call(node, (torch.softmax, F.softmax), ("softmax",)):
        if not _last_dim(node, 1):
            raise NotARouter("softmax over another dimension than the experts")
        return "softmax"
    if is_call(node, (torch.sigmoid, F.sigmoid), ("sigmoid",)):
        return "sigmoid"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _Router:
    """What the pattern read off the graph in front of one experts node."""

    experts: fx.Node
    x: fx.Node
    linear: fx.Node
    weight: fx.Node
    top_k: int
    score_func: str = "softmax"
    score_node: fx.Node | None = None
    after_topk: bool = False
    router_bias: fx.Node | None = None
    score_bias: fx.Node | None = None
    expert_scale: fx.Node | None = None
    router_input: fx.Node | None = None
    """What the router's linear reads where that is not the experts' input up to casts and views (Gemma-4)."""
    renormalize: bool = False
    renorm_eps: float = 0.0
    renorm_min: float = 0.0
    scale: float = 1.0
    visited: list = field(default_factory=list)

    def spec(self) -> MoESpec:
        dtype = lambda n: example_value(n).dtype  # noqa: E731
        low = dtype(self.source) != torch.float32
        logits_fp32 = low and dtype(self.linear) == torch.float32
        scores_in_fp32 = dtype(self.score_node) == torch.float32
        # a softmax over all experts in the logits' own low precision (DBRX's): its scores rounded there
        low_softmax = self.score_func == "softmax" and not self.after_topk and not scores_in_fp32
        if low_softmax and logits_fp32:
            raise NotARouter("softmax of fp32 logits taken in low precision")
        routing = RoutingSpec(
            score_func=self.score_func, score_after_topk=self.after_topk, renormalize=self.renormalize,
            renorm_eps=self.renorm_eps, renorm_min=self.renorm_min, scale=self.scale,
            router_bias=self.router_bias is not None, score_bias=self.score_bias is not None,
            expert_scale=self.expert_scale is not None,
            logits_fp32=logits_fp32,
            scores_fp32=(low and not logits_fp32 and scores_in_fp32
                         and (self.score_func == "sigmoid" or self.after_topk)),
            weights_fp32=low and dtype(self.experts.args[2]) == torch.float32, softmax_in_logits_dtype=low_softmax)
        E, H = example_value(self.weight).shape
        if self.expert_scale is not None and example_value(self.expert_scale).numel() != E:
            raise NotARouter("the weights are scaled by a per-expert tensor of another size than the experts")
        slots = ["router_weight"] + ["router_bias"] * (self.router_bias is not None) + ["score_bias"] * (
            self.score_bias is not None) + ["expert_scale"] * (self.expert_scale is not None)
        return MoESpec(name="router", num_experts=E, top_k=self.top_k, hidden=H, intermediate=0, routing=routing,
                       slots=tuple(slots))

    @property
    def source(self) -> fx.Node:
        """The route's input: the experts' input, or the router's own."""
        return self.x if self.router_input is None else self.router_input

    def params(self) -> list[fx.Node]:
        return [n for n in (self.weight, self.router_bias, self.score_bias, self.expert_scale) if n is not None]


# ---- reading the pattern ---------------------------------------------------------------------------
def read_router(experts: fx.Node) -> _Router:
    """The router in front of an experts node, or NotARouter saying which step does not match."""
    x, index, weights = experts.args[:3]
    topk = topk_of(_strip(index, VIEWS), 1)
    if topk is None:
        raise NotARouter("the experts' indices are not a top-k")
    k = _arg(topk, 1, "k")
    if not isinstance(k, int) or not _last_dim(topk, 2) or _arg(topk, 3, "largest", True) is not True:
        raise NotARouter("a top-k over another dimension, of the smallest, or of a traced k")
    choice = _strip(topk.args[0])
    router = _router_head(experts, x, choice, k)
    router.visited += [topk, choice]
    if router.after_topk:
        _read_after_topk_weights(router, weights, topk)
    else:
        _read_weights(router, weights, topk)
    return router


def _reads(node, x: fx.Node) -> bool:
    """node is x up to casts and views."""
    while not same_base(node, x):
        if not is_call(node, methods=CASTS | VIEWS):
            return False
        node = node.args[0]
    return True


def _router_head(experts, x, choice, k) -> _Router:
    """Scores, selection bias and router linear behind the top-k's input."""
    bias = None
    if is_call(choice, (operator.add, torch.add), ("add",)):
        a, b = (_strip(v) for v in choice.args[:2])
        scores, bias = (a, b) if _score_func(a) else (b, a)
        if _score_func(scores) is None and any(is_call(v, LINEARS) for v in (a, b)):
            raise NotARouter("a selection bias on raw logits")
        bias = _strip(bias, VIEWS)
        if _score_func(scores) is None or not isinstance(bias, fx.Node) or bias.op != "placeholder":
            raise NotARouter("top-k of scores plus something other than a per-expert input tensor")
    else:
        scores = choice
    score_func = _score_func(scores)
    after = score_func is None
    linear = scores if after else _strip(scores.args[0])
    if after and bias is not None:
        raise NotARouter("a selection bias on raw logits")
    if not is_call(linear, LINEARS):
        raise NotARouter("the scores are not of a router linear layer (e.g. soft-capped or rescaled logits)")
    weight = _strip(linear.args[1])
    c = _arg(linear, 2, "bias")
    c = _strip(c) if c is not None else None
    if weight.op != "placeholder" or (c is not None and c.op != "placeholder"):
        raise NotARouter("the router's weight is computed in the graph")
    router_input = None
    if not _reads(linear.args[0], x):  # Gemma-4: a norm of the residual; the route takes it as its input
        router_input = _strip(linear.args[0])
        value = example_value(router_input)
        if value is None or value.dim() != 2 or value.shape[-1] != example_value(x).shape[-1]:
            raise NotARouter("the router reads a tensor of another shape than the experts' input")
    if example_value(x).dim() != 2:
        raise NotARouter("the experts' input is not [tokens, hidden]")
    E = example_value(weight).shape[0]
    if bias is not None and example_value(bias).numel() != E:
        raise NotARouter("a selection bias with another size than the experts")
    return _Router(experts=experts, x=x, linear=linear, weight=weight, top_k=k, score_func=score_func or "softmax",
                   score_node=None if after else scores, after_topk=after, router_bias=c, score_bias=bias,
                   router_input=router_input, visited=[scores, linear])


def _read_weights(router: _Router, weights, topk) -> None:
    """scale, renormalisation and the gathered scores behind the experts' weights."""
    w = _strip(weights)
    while is_call(w, (operator.mul, operator.imul, torch.mul), ("mul",)):  # a constant, or a per-expert tensor
        a, b = w.args[:2]
        factor, w = (a, b) if _number(a) or _per_expert(a, topk) is not None else (b, a)
        if _number(factor) and router.scale == 1.0:
            router.scale = float(factor)
        elif _per_expert(factor, topk) is not None and router.expert_scale is None:
            router.expert_scale = _per_expert(factor, topk)
            router.visited.append(factor)
        else:
            raise NotARouter("the weights are scaled by a tensor other than one value per expert")
        w = _strip(w)
    if is_call(w, _DIVS, ("div", "div_", "true_divide")):
        w = _read_renormalisation(router, w)
    router.visited.append(w)
    if topk_of(w, 0) is topk and router.score_bias is None and _strip(topk.args[0]) is router.score_node:
        return  # the top-k's values are the gathered scores
    if not is_call(w, (torch.gather,), ("gather",)) or _strip(w.args[0]) is not router.score_node:
        raise NotARouter("the weights are not the selected scores")
    if not _last_dim(w, 1) or topk_of(_strip(_arg(w, 2, "index"), VIEWS), 1) is not topk:
        raise NotARouter("the weights gather other positions than the top-k's")


def _per_expert(node, topk) -> fx.Node | None:
    """The graph input t of ``t[index]`` (one value per expert, at the top-k's experts), else None."""
    node = _strip(node)
    if not is_call(node, (operator.getitem,)) or not isinstance(node.args[0], fx.Node):
        return None
    table, index = _strip(node.args[0], VIEWS), node.args[1]
    if table.op != "placeholder" or not isinstance(index, fx.Node) or topk_of(_strip(index, VIEWS), 1) is not topk:
        return None
    return table


def _read_renormalisation(router: _Router, div: fx.Node) -> fx.Node:
    numerator, denominator = (_strip(v) for v in div.args[:2])
    if is_call(denominator, (operator.add, torch.add), ("add",)):
        a, b = denominator.args[:2]
        eps, denominator = (a, b) if _number(a) else (b, a)
        if not _number(eps) or eps < 0:
            raise NotARouter("a renormalisation denominator plus a tensor")
        router.renorm_eps = float(eps)
        denominator = _strip(denominator)
    if is_call(denominator, (torch.clamp, torch.clamp_min), ("clamp", "clamp_min")):
        low = _arg(denominator, 1, "min")
        if not _number(low) or _arg(denominator, 2, "max") is not None or router.renorm_eps:
            raise NotARouter("a renormalisation clamped other than from below by a constant")
        router.renorm_min = float(low)
        denominator = _strip(denominator.args[0])
    if not (_is_sum_of(denominator, numerator) or _is_one_norm_of(denominator, numerator)):
        raise NotARouter("the weights are divided by something other than their sum")
    router.renormalize = True
    router.visited += [div, denominator]
    return numerator


def _is_sum_of(node, weights) -> bool:
    return (is_call(node, (torch.sum,), ("sum",)) and _strip(node.args[0]) is weights and _last_dim(node, 1)
            and _arg(node, 2, "keepdim", False) is True)


def _is_one_norm_of(node, weights) -> bool:
    """``torch.norm(w, p=1, dim=-1, keepdim=True)`` (DBRX's ``moe_normalize_expert_weights=1``), or its
    ``torch.linalg.vector_norm`` form: the sum of the weights, which scores (softmax, sigmoid) keep non-negative."""
    if is_call(node, (torch.norm, torch.functional.norm), ("norm",)):
        p = _arg(node, 1, "p", "fro")
    elif is_call(node, (torch.linalg.vector_norm,)):
        p = _arg(node, 1, "ord", 2)
    else:
        return False
    return (_strip(node.args[0]) is weights and p == 1 and _last_dim(node, 2)
            and _arg(node, 3, "keepdim", False) is True)


def _read_after_topk_weights(router: _Router, weights, topk) -> None:
    w = _strip(weights)
    if _score_func(w) != "softmax" or topk_of(_strip(w.args[0]), 0) is not topk:
        raise NotARouter("top-k of logits, but the weights are not the softmax of its values")
    router.score_node = w
    router.visited.append(w)


# ---- checking and rewriting ------------------------------------------------------------------------
def _reproduces(router: _Router, spec: MoESpec, values, value_of) -> bool:
    """The spec's index sets equal the graph's on every example token, and its weights match them."""
    x = values[router.source]
    _, weights, index = reference.route(x, [value_of[p] for p in router.params()], spec)
    got_index, got_weights = values[router.experts.args[1]], values[router.experts.args[2]]
    if got_index.shape != index.shape or x.shape[0] == 0:
        return False
    mine, theirs = index.sort(dim=-1), got_index.long().sort(dim=-1)
    if not torch.equal(mine.values, theirs.values):
        return False
    w = weights.gather(1, mine.indices).double()
    ref = got_weights.gather(1, theirs.indices).double()
    # the same ops in the same dtypes: equal up to the last bit of the graph's weights (fp32: summation order)
    rtol = 1e-5 if got_weights.dtype == torch.float32 else torch.finfo(got_weights.dtype).eps
    return bool(torch.isfinite(w).all()) and torch.allclose(w, ref, rtol=rtol, atol=1e-7)


def _rewrite(gm: fx.GraphModule, router: _Router, spec: MoESpec) -> None:
    experts = router.experts
    with gm.graph.inserting_before(experts):
        params = [router.weight]
        if router.router_bias is not None:
            params.append(router.router_bias)
        if router.score_bias is not None:  # Ernie keeps it as [1, E]
            params.append(gm.graph.call_method("reshape", (router.score_bias, -1)))
        if router.expert_scale is not None:
            params.append(router.expert_scale)
        route = gm.graph.call_function(ROUTE, (router.source, params, spec.to_json()))
        weights = gm.graph.call_function(operator.getitem, (route, 1))
        index = gm.graph.call_function(operator.getitem, (route, 2))
    region = _region(router)
    experts.args = (experts.args[0], index, weights, *experts.args[3:])
    for node in reversed(list(gm.graph.nodes)):  # the old router's ops, where nothing else reads them
        if node in region and not node.users and not node.is_impure() and not str(node.target).endswith("_"):
            gm.graph.erase_node(node)


def _region(router: _Router) -> set:
    """The router's own ops: from the experts' index and weights back to (not into) the route's input."""
    region, stack = set(), [router.experts.args[1], router.experts.args[2], *router.visited]
    while stack:
        node = stack.pop()
        if (isinstance(node, fx.Node) and node not in region and node.op in ("call_function", "call_method")
                and not same_base(node, router.x) and not same_base(node, router.source)):
            region.add(node)
            stack.extend(node.all_input_nodes)
    return region


def capture_plain_routers(gm: fx.GraphModule, example_inputs) -> int:
    """Give each experts marker whose routing is plain ops a ``dualsparse.route`` call; returns how many."""
    found = []
    for node in gm.graph.nodes:
        if not _is(node, EXPERTS) or _route_output(node.args[1], 2) is not None:
            continue
        try:
            router = read_router(node)
            found.append((router, router.spec()))
        except NotARouter as why:
            node.meta[ROUTE_REASON] = str(why)
    if not found:
        return 0
    value_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    wanted = {n for r, _ in found for n in (r.source, *r.experts.args[1:3])}
    values = recorded_values(gm, example_inputs, wanted)
    done = 0
    for router, spec in found:
        if _reproduces(router, spec, values, value_of):
            _rewrite(gm, router, spec)
            done += 1
        else:
            router.experts.meta[ROUTE_REASON] = f"its router read as {spec.variant} did not reproduce the graph's routing"
    return done
