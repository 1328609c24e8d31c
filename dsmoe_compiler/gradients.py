"""Gradients through the MoE operators: a backward that reruns the reference under autograd.

The kernels are inference kernels. A graph that can need gradients (grad mode on and an input that requires
them: training, or inference written without ``torch.no_grad()``) gets ``dualsparse::moe_trainable`` in place
of ``dualsparse::moe`` (``bind_gradients``). Its forward is the same call, kernels included; its backward runs
the block's reference implementation again under autograd and returns its vector-Jacobian product
(``dualsparse::moe_backward``, opaque to AOT autograd and inductor like the forward). That is exact: the
reference is the operator's definition (the kernels are checked against it), and a dropping block recomputes
the same kept pairs from the same thresholds (on the kernels: up to exact ties, which their routing may break
the other way). The recompute runs all sub-experts' products at once (``batched_experts``: ``torch._grouped_mm``
where it takes them, else batched products over padded rows);
``benchmarks/train_step.py`` times a training step against inductor's. This backend is for inference.

Inference graphs keep ``dualsparse::moe``, which has no autograd formula: a Python autograd kernel would add
its dispatch to every call (``ops.py`` says why that operator avoids ``@custom_op``). Dynamo guards on grad
mode and on ``requires_grad``, so a model compiled for one case recompiles for the other.

Expert parallelism: a model that holds every expert (not sharded by ``shard_experts_``) gets the same backward, run
on each rank's own tokens with all experts (``dualsparse::ep_trainable``): each rank's gradients are those of its own
loss, as without EP, and data parallelism averages them as usual. The backward exchanges nothing and saves no expert
work. The EP forward keeps the reference's pairs with dropping off or uniform thresholds
(``passes/expert_parallel.py``); under a load-aware drop policy it does not, and that backward raises. A sharded
model's block output passes through ``dualsparse::inference_only``, whose backward raises naming the block, instead of
leaving the experts' gradients silently out.

Before this module, a backward through a compiled block (AOT autograd: the inductor and aot_eager inner
compilers, or the Triton kernels) left the router's and experts' gradients out and gave wrong gradients
upstream, without an error. Tests: ``tests/test_gradients.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx

from dsmoe_compiler import ops
from dsmoe_compiler.codegen import cpu_grouped, reference
from dsmoe_compiler.codegen.reference import parse_spec

_LIB = torch.library.Library("dualsparse", "FRAGMENT")


def reference_vjp(fn, inputs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The gradients of ``fn(*inputs)``'s outputs (weighted by ``grads``; None: that output has none) against
    ``inputs``, by running ``fn`` again under autograd. Inputs that are not floating point get zeros."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        outputs = fn(*leaves)
        used = [(out, g) for out, g in zip(outputs, grads) if g is not None and out.requires_grad]
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad([out for out, _ in used], wanted, [g for _, g in used], allow_unused=True)
                     if used and wanted else [None] * len(wanted))
    grads_in = [next(found) if t.requires_grad else None for t in leaves]
    return [_like(t, g) for g, t in zip(grads_in, inputs)]


def _like(t: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """The gradient in ``t``'s layout, as the backward ops' fakes promise (``empty_like``): AOT autograd's backward
    may view it the way the forward viewed ``t`` (DBRX's down weights are a transposed view)."""
    if grad is None:
        return torch.zeros_like(t)
    return grad if grad.stride() == t.stride() else torch.empty_like(t).copy_(grad)


def batched_experts(x, index, weights, params, spec, keep=None) -> torch.Tensor:
    """``reference.experts`` as a few products over all sub-experts at once: under autograd, a handful of ops a block
    instead of a dozen a sub-expert (the loop made a training step host-bound). Where ``torch._grouped_mm`` takes the
    operands (``_grouped_fits``), each product is one grouped call over the kept pairs sorted by sub-expert; else a
    batched product with each sub-expert's rows padded to the fullest one's count, or the loop itself when padding
    would more than quadruple the rows."""
    subs, ex = spec.num_experts * spec.partition, spec.experts
    order, counts = reference.sorted_pairs(index, keep, subs)
    stacked = _stacked_sub_experts(params, spec, subs)
    grouped = _grouped_fits(x, spec, stacked)
    if grouped:  # no host read without dropped pairs: every pair is kept
        kept = index.numel() if keep is None else int(counts.sum())
    else:
        kept, cap = int(counts.sum()), int(counts.max()) if subs else 0  # one host read of two numbers
        if subs * cap > 4 * kept + 4096:
            return reference.experts(x, index, weights, params, spec, keep)
    order = order[:kept]
    sub = torch.repeat_interleave(torch.arange(subs, device=x.device), counts, output_size=kept)
    token = order // index.shape[1]
    w = weights.flatten()[order].unsqueeze(-1)
    xs = x[token]
    if ex.weight_on_input:
        xs = (xs * w).to(xs.dtype)
    if grouped:  # the rows in sub-expert order, as they are
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        grouped_linear = lambda rows, weight, bias: _GroupedLinear.apply(rows, weight, bias, offs, sub)  # noqa: E731
        y = _sub_experts(xs, stacked, ex, grouped_linear)
    else:  # each kept pair's row in the padded batch [subs * cap]: its sub-expert's block, then its rank there
        row = sub * cap + torch.arange(kept, device=x.device) - (torch.cumsum(counts, 0) - counts)[sub]
        # index_copy / index_select on unique rows: their backwards are a gather and a plain scatter, where indexing
        # with (sub, rank) pairs took autograd's sorting accumulate
        padded = xs.new_zeros(subs * cap, x.shape[1]).index_copy(0, row, xs).view(subs, cap, x.shape[1])
        y = _sub_experts(padded, stacked, ex, _batched_linear).flatten(0, 1).index_select(0, row)
    y = (y if ex.weight_on_input else y * w).to(torch.promote_types(x.dtype, torch.float32))
    # each token's sum over its k slots, from rows put back in pair order (dropped pairs: zero rows): a dense sum,
    # not index_add_'s atomics
    by_pair = y.new_zeros(index.numel(), x.shape[1]).index_copy(0, order, y)
    return by_pair.view(*index.shape, x.shape[1]).sum(dim=1).to(x.dtype)


def _sub_experts(rows, stacked: "_SubExperts", ex, linear):
    """Gate/up, GLU and down of the rows, each product ``linear(rows, weight [S, out, in], bias [S, out])`` over all
    sub-experts at once (grouped or padded rows)."""
    if stacked.gate_up is not None:  # gate and up rows in one weight: one product, then split as they are laid out
        both = linear(rows, stacked.gate_up, stacked.gate_up_bias)
        g, u = (both[..., 0::2], both[..., 1::2]) if ex.interleaved else both.chunk(2, dim=-1)
    else:
        g = None if stacked.gate is None else linear(rows, stacked.gate, stacked.gate_bias)
        u = linear(rows, stacked.up, stacked.up_bias)
    return linear(reference.expert_glu(g, u, ex), stacked.down, stacked.down_bias)


def _grouped_fits(x: torch.Tensor, spec, stacked: "_SubExperts") -> bool:
    """Whether ``torch._grouped_mm`` takes the recompute's products: bf16 on a Hopper or newer GPU, or a CPU
    ``_grouped_mm``'s dtypes (fp32, bf16, fp16; not the fp64 of the property tests, which take the padded
    products); every weight in x's dtype with the strides it takes, and rows of 16-byte multiples."""
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.dtype not in cpu_grouped.GROUPED_DTYPES or not cpu_grouped.grouped_mm_on_cpu():
        return False
    if not cpu_grouped.rows_fit(spec, x):
        return False
    weights = [stacked.gate_up, stacked.gate, stacked.up, stacked.down]
    return all(w is None or (w.dtype == x.dtype and cpu_grouped.fits(w) and w.data_ptr() % 16 == 0) for w in weights)


def _column_major(weight: torch.Tensor) -> bool:
    """A [S, out, in] weight stored [S, in, out] (a transposed view): its gradient is wanted in that layout."""
    return weight.stride(-2) == 1 and weight.stride(-1) != 1


class _GroupedLinear(torch.autograd.Function):
    """rows [n, in], sorted by sub-expert (offs: each one's end; sub: each row's), times their sub-expert's weight
    [S, out, in]^T plus its bias [S, out]: one ``torch._grouped_mm``, no padding. The weight's gradient is a grouped
    product over the rows (a sub-expert without rows gets zeros), in the weight's own layout as in
    ``_SubExpertLinear``; the bias's is each sub-expert's sum of its rows' gradients, accumulated in fp32 by a
    grouped product with a column of ones (autograd's gradient of ``bias[sub]`` accumulates in the bias's dtype: 1.1e-2
    off in bf16 at GPT-OSS's layout on the H200, and by atomics)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, offs, sub):
        ctx.save_for_backward(rows, weight, offs)
        ctx.has_bias = bias is not None
        y = torch._grouped_mm(rows, weight.transpose(1, 2), offs=offs)
        return y if bias is None else y + bias[sub]

    @staticmethod
    def backward(ctx, grad):
        rows, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_rows = torch._grouped_mm(grad, weight, offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_w = (torch._grouped_mm(rows.t(), grad, offs=offs).transpose(1, 2) if _column_major(weight)
                      else torch._grouped_mm(grad.t(), rows, offs=offs))
        if ctx.has_bias and ctx.needs_input_grad[2]:  # 8 columns of ones: rows of 16 bytes, as the product takes
            grad_bias = torch._grouped_mm(grad.t(), grad.new_ones(grad.shape[0], 8), offs=offs)[..., 0]
        return grad_rows, grad_w, grad_bias, None, None


class _SubExpertLinear(torch.autograd.Function):
    """x [S, C, in] times weight [S, out, in]^T, with the weight's gradient computed in the weight's own layout.
    Autograd's ``bmm`` backward gives it as the transpose of another product ([S, in, out] transposed), which
    the parameter's gradient then copied into place, a strided copy of every expert weight (on the H200 the
    largest kernel time of a training step, ``results/h200/train_step_profile_s23.log``)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # [S, out, in], laid out as the weight is (rows or columns contiguous)
            grad_w = (torch.bmm(x.transpose(1, 2), grad).transpose(1, 2) if _column_major(weight)
                      else torch.bmm(grad.transpose(1, 2), x))
        return grad_x, grad_w


def _batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` per sub-expert: x [S, C, in], weight [S, out, in], bias [S, out]."""
    y = _SubExpertLinear.apply(x, weight)
    return y if bias is None else y + bias.unsqueeze(1)


@dataclass
class _SubExperts:
    """Every sub-expert's weights stacked over sub-experts ([S, out, in], biases [S, out]); None where the block has
    none. ``gate_up`` holds gate and up rows in one weight [S, 2c, in] (gate rows then up rows, or alternating where
    interleaved), in place of ``gate`` and ``up``."""

    down: torch.Tensor
    down_bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None


def _stacked_sub_experts(params, spec, subs: int) -> _SubExperts:
    """``reference.sub_expert_weights`` of every sub-expert, stacked ([S, ...]); a weight no sub-expert has stays
    None, one that only some have (the down bias, on the Major halves) is zero on the others. 3-D expert tensors
    are reshaped whole (``_whole_tensor_sub_experts``)."""
    ex = spec.experts
    if ex.layout == "separate" or (ex.layout == "fused" and ex.gated):
        return _whole_tensor_sub_experts(params, spec)
    stacked = []
    for parts in zip(*(reference.sub_expert_weights(params, spec, s) for s in range(subs))):
        present = [p for p in parts if p is not None]
        stacked.append(torch.stack([torch.zeros_like(present[0]) if p is None else p for p in parts])
                       if present else None)
    gate, up, down, gate_bias, up_bias, down_bias = stacked
    return _SubExperts(down, down_bias, gate, up, gate_bias, up_bias)


def _whole_tensor_sub_experts(params, spec) -> _SubExperts:
    """The same for 3-D expert tensors, from reshapes of whole tensors (views where P = 1): the backward of a view is
    one full-size gradient, so a view per sub-expert would write the whole weight's size once per sub-expert. A fused
    gated weight stays one ``gate_up``."""
    ex, E, P, I = spec.experts, spec.num_experts, spec.partition, spec.intermediate
    c = I // P
    tensor = functools.partial(reference.expert_tensor, params, spec)  # weights [E, out, in], biases [E, out]

    def by_rows(w):  # [E, I, ...] -> [E * P, c, ...]: sub-expert e * P + p holds rows p * c .. (p + 1) * c
        return None if w is None else w.reshape(E * P, c, *w.shape[2:])

    def stacked_rows(w):  # [E, 2I, ...] (gate rows, up rows) -> [E * P, 2c, ...], group p's gate rows then up rows
        if ex.interleaved:  # g, u, g, u, ...: group p's 2c rows are already together
            return w.reshape(E * P, 2 * c, *w.shape[2:])
        return w.reshape(E, 2, P, c, *w.shape[2:]).transpose(1, 2).reshape(E * P, 2 * c, *w.shape[2:])

    down = tensor("down")  # [E, H, I] -> [E * P, H, c]
    down = down.reshape(E, down.shape[1], P, c).transpose(1, 2).reshape(E * P, down.shape[1], c)
    down_bias = tensor("down_bias")
    if down_bias is not None:  # the whole expert's bias, on its Major half (p = 0) only
        down_bias = torch.stack([down_bias, *[torch.zeros_like(down_bias)] * (P - 1)], dim=1).reshape(E * P, -1)
    if ex.layout == "separate":
        return _SubExperts(down, down_bias, gate=by_rows(tensor("gate")), up=by_rows(tensor("up")),
                           gate_bias=by_rows(tensor("gate_bias")), up_bias=by_rows(tensor("up_bias")))
    gate_up_bias = tensor("gate_up_bias")
    return _SubExperts(down, down_bias, gate_up=stacked_rows(tensor("gate_up")),
                       gate_up_bias=None if gate_up_bias is None else stacked_rows(gate_up_bias))


def _param_grads(grads: list[torch.Tensor], params) -> list[torch.Tensor | None]:
    """Autograd takes no gradient for an integer input (given top-k indices, expert maps)."""
    return [g if p.is_floating_point() else None for g, p in zip(grads, params)]


def _define_backward(schema: str, kernel, differentiated) -> None:
    """A backward op: opaque to AOT autograd and inductor (a fake returns one empty gradient per tensor that
    ``differentiated`` lists). Registered through ``Library`` with no autograd kernel of its own, so that the
    reference ops inside it record their autograd graph (``@custom_op`` runs its kernel below autograd)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dualsparse::{name}")(
        lambda *args: [torch.empty_like(t) for t in differentiated(*args)])


# ---- the whole block -------------------------------------------------------------------------------------
# ``impl`` has no default: the dispatcher drops arguments equal to their defaults before autograd sees them,
# and the backward must return one gradient per argument passed
_LIB.define("moe_trainable(Tensor x, Tensor[] params, str spec, str impl) -> Tensor")
_LIB.impl("moe_trainable", ops.run_moe, "CompositeExplicitAutograd")
torch.library.register_fake("dualsparse::moe_trainable")(lambda x, params, spec, impl: torch.empty_like(x))


def _moe_backward(grad, x, params, spec_json):
    spec = parse_spec(spec_json)
    thresholds, _ = ops.drop_state(spec)

    def block(x, *params):  # no drop statistics: the forward counted them
        return (reference.moe(ops.flat(x), list(params), spec, thresholds, routed=batched_experts).view_as(x),)

    return reference_vjp(block, [x, *params], [grad])


_define_backward("moe_backward(Tensor grad, Tensor x, Tensor[] params, str spec) -> Tensor[]", _moe_backward,
                 lambda grad, x, params, spec: [x, *params])


def _register_block_autograd(op: str, backward, before: int, after: int) -> None:
    """op's inputs: ``before`` without a gradient, then (x, params, spec), then ``after`` more; its gradients for x
    and params come from ``backward(grad, x, params, spec) -> [grad_x, *grad_params]``."""
    def save_inputs(ctx, inputs, output):
        x, params, ctx.spec = inputs[before:before + 3]
        ctx.save_for_backward(x, *params)

    def gradients(ctx, grad):
        x, *params = ctx.saved_tensors
        grad_x, *grad_params = backward(grad, x, params, ctx.spec)
        return (None,) * before + (grad_x, _param_grads(grad_params, params)) + (None,) * (1 + after)

    torch.library.register_autograd(op, gradients, setup_context=save_inputs)


_register_block_autograd("dualsparse::moe_trainable", torch.ops.dualsparse.moe_backward, before=0, after=1)
MOE_TRAINABLE = torch.ops.dualsparse.moe_trainable.default


# ---- the capture markers (exact on their own when a pair stays unfused) ----------------------------------
def _route_backward(grad_logits, grad_weights, x, params, spec):
    parsed = parse_spec(spec)
    return reference_vjp(lambda x, *params: reference.route(ops.flat(x), list(params), parsed)[:2],
                         [x, *params], [grad_logits, grad_weights])


_define_backward("route_backward(Tensor? grad_logits, Tensor? grad_weights, Tensor x, Tensor[] params, str spec) "
                 "-> Tensor[]", _route_backward, lambda gl, gw, x, params, spec: [x, *params])


def _save_route_inputs(ctx, inputs, output):
    x, params, ctx.spec = inputs
    ctx.save_for_backward(x, *params)


def _route_grad(ctx, grad_logits, grad_weights, _grad_index):
    x, *params = ctx.saved_tensors
    grad_x, *grad_params = torch.ops.dualsparse.route_backward(grad_logits, grad_weights, x, params, ctx.spec)
    return grad_x, _param_grads(grad_params, params), None


ops.route.register_autograd(_route_grad, setup_context=_save_route_inputs)


def _experts_backward(grad, x, index, weights, params, spec):
    parsed = parse_spec(spec)
    return reference_vjp(lambda x, weights, *params: (batched_experts(x, index, weights, list(params), parsed),),
                         [x, weights, *params], [grad])


_define_backward("experts_backward(Tensor grad, Tensor x, Tensor index, Tensor weights, Tensor[] params, str spec) "
                 "-> Tensor[]", _experts_backward, lambda grad, x, index, weights, params, spec: [x, weights, *params])


def _save_experts_inputs(ctx, inputs, output):
    x, index, weights, params, ctx.spec = inputs
    ctx.save_for_backward(x, index, weights, *params)


def _experts_grad(ctx, grad):
    x, index, weights, *params = ctx.saved_tensors
    grad_x, grad_weights, *grad_params = torch.ops.dualsparse.experts_backward(grad, x, index, weights, params, ctx.spec)
    return grad_x, None, grad_weights, _param_grads(grad_params, params), None


ops.experts.register_autograd(_experts_grad, setup_context=_save_experts_inputs)


# ---- operators without a backward -------------------------------------------------------------------------
# A backward that raises must sit in the gradients that the block's inputs receive: AOT autograd traces the
# backward graph at compile time (so the raise is an opaque op, run only by a real backward) and removes
# every node whose result no gradient uses.
def _raise(grad, inputs, why):
    raise RuntimeError(f"dualsparse: {why}")


_define_backward("no_backward(Tensor grad, Tensor[] inputs, str why) -> Tensor[]", _raise,
                 lambda grad, inputs, why: inputs)

_LIB.define("inference_only(Tensor out, Tensor[] inputs, str why) -> Tensor")
_LIB.impl("inference_only", lambda out, inputs, why: out.clone(), "CompositeExplicitAutograd")
torch.library.register_fake("dualsparse::inference_only")(lambda out, inputs, why: torch.empty_like(out))


def _save_inputs_and_why(ctx, inputs, output):
    _, block_inputs, ctx.why = inputs
    ctx.save_for_backward(*block_inputs)


def _raise_in_backward(ctx, grad):
    inputs = list(ctx.saved_tensors)
    return None, _param_grads(torch.ops.dualsparse.no_backward(grad, inputs, ctx.why), inputs), None


torch.library.register_autograd("dualsparse::inference_only", _raise_in_backward, setup_context=_save_inputs_and_why)


# ---- expert parallelism on a model that holds every expert ----------------------------------------------
def _ep_backward(grad, x, params, spec_json):
    spec = parse_spec(spec_json)
    if spec.drop.mode != "none":
        from dsmoe_compiler.runtime import load_aware

        if load_aware.get_policy(spec.name) is not None:  # read per call: a policy can be set after compiling
            raise RuntimeError(f"dualsparse: MoE block {spec.name} runs expert parallelism with a load-aware drop "
                               "policy, which keeps other pairs than the block's own thresholds and has no backward; "
                               "clear the policy (runtime.load_aware.clear()) or run it under torch.no_grad()")
    return _moe_backward(grad, x, params, spec_json)


_define_backward("ep_backward(Tensor grad, Tensor x, Tensor[] params, str spec) -> Tensor[]", _ep_backward,
                 lambda grad, x, params, spec: [x, *params])

# ``out`` is the EP block's output (ep_combine's, which has no autograd formula); its gradients for the block's
# input and parameters come from the local recompute
_LIB.define("ep_trainable(Tensor out, Tensor x, Tensor[] params, str spec) -> Tensor")
_LIB.impl("ep_trainable", lambda out, x, params, spec: out.clone(), "CompositeExplicitAutograd")
torch.library.register_fake("dualsparse::ep_trainable")(lambda out, x, params, spec: torch.empty_like(out))


_register_block_autograd("dualsparse::ep_trainable", torch.ops.dualsparse.ep_backward, before=1, after=0)


# ---- the backend's choice --------------------------------------------------------------------------------
def may_need_gradients(gm: fx.GraphModule, example_inputs) -> bool:
    """Grad mode is on, or the graph turns it on, and some input or parameter requires grad: AOT autograd's own
    rule for tracing a backward."""
    requires = (any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
                or any(p.requires_grad for p in gm.parameters()))
    turns_on = any(node.target is torch._C._set_grad_enabled and node.args[:1] == (True,) for node in gm.graph.nodes)
    return requires and (torch.is_grad_enabled() or turns_on)


def bind_gradients(gm: fx.GraphModule, example_inputs) -> int:
    """Give each MoE node of a graph that may need gradients its backward; returns how many were bound."""
    if not may_need_gradients(gm, example_inputs):
        return 0
    bound = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is ops.moe.default:
            node.target = MOE_TRAINABLE
            bound += 1
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.name() == "dualsparse::ep_combine":
            x, params, spec_json = node.args[0], node.args[4], node.args[5]
            spec = parse_spec(spec_json)
            if spec.experts.local_experts:  # sharded: the other ranks' experts are not here to recompute with
                why = (f"MoE block {spec.name} runs expert parallelism on a model sharded by shard_experts_, which "
                       "has no backward; run it under torch.no_grad() or torch.inference_mode()")
                _route_output(gm, node, torch.ops.dualsparse.inference_only.default, [x, *params], why)
            else:
                _route_output(gm, node, torch.ops.dualsparse.ep_trainable.default, x, params, spec_json)
            bound += 1
    return bound


def _route_output(gm: fx.GraphModule, node: fx.Node, target, *args) -> None:
    """Route ``node``'s uses through ``target(node, *args)``: the op whose backward gives (or refuses) the
    gradients of the block's input and parameters."""
    with gm.graph.inserting_after(node):
        routed = gm.graph.call_function(target, (node, *args))
    node.replace_all_uses_with(routed, delete_user_cb=lambda user: user is not routed)
    routed.meta.update(node.meta)
