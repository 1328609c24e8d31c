"""Capture of Hugging Face transformers MoE blocks: routers and experts become traceable markers.

Mechanism (and why): transformers v5 dispatches an experts module's forward at call time through
``ExpertsInterface.get_interface(config._experts_implementation, ...)``. Its "eager" implementation
loops over ``nonzero()`` results and breaks the graph; "grouped_mm" and "batched_mm" trace but bury
the block in dozens of ops. While a model compiled with ``dualsparse`` runs (our backend's
``backend_ctx_ctor``, entered around every call, tracing included), this module:

- makes ``get_interface`` hand out ``experts_forward`` below, whatever the configured
  implementation is: for an experts module it can describe exactly, it emits one
  ``torch.ops.dualsparse.experts`` call (no data-dependent shapes, so no graph break); otherwise it
  falls back to the configured implementation and leaves a ``dualsparse.left_alone`` marker saying
  why;
- replaces the ``forward`` of the router classes it knows (``ROUTERS``), and of every class of a loaded
  transformers modeling module whose code is theirs under another name (``_router_classes``), by one
  ``torch.ops.dualsparse.route`` call.

The backend then fuses each route/experts pair into one ``dualsparse.moe`` node. Everything is
restored when the call returns, so other compiles in the process never see these patches.

Limits: routers are recognised by class or by identical code (any other router stays plain ops and the experts take
its routing as given); experts need a known activation and, where they have one of their own, a known
``_apply_gate`` (``_GATES``); post-expert norms and expert-parallel sentinels fall back. Calls of the model from
several threads at once, one compiled with dualsparse and one not, would see the patches too.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import threading
import types

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_scalar

from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec

_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "ReLU": "relu", "ReLUSquaredActivation": "relu2",
                "GELUTanh": "gelu_tanh",
                "GELUActivation": "gelu", "PytorchGELUTanh": "gelu_tanh"}


def constant_plan(fn):
    """``torch._dynamo.assume_constant_result`` for a plan function whose arguments are read in traced code.

    Under ``torch.compile(..., dynamic=True)`` dynamo makes the floats it reads off modules (a router's scaling factor)
    and the shapes of a resumed frame's inputs symbolic, and ``assume_constant_result`` refuses symbolic arguments: a
    graph break at every MoE block. Each number is specialised first (``guard_scalar``: dynamo guards on its value, so
    a changed value recompiles). Test: ``test_capture_hf.py::test_dynamic_shapes_compile_one_graph``.
    """
    constant = torch._dynamo.assume_constant_result(fn)

    @functools.wraps(fn, updated=())  # not its __dict__: the wrapper must not be marked constant itself
    def plan(*args):
        return constant(*_specialised(args))

    return plan


def _specialised(value):
    if isinstance(value, (tuple, list)):
        return type(value)(_specialised(v) for v in value)
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool):
        return guard_scalar(value)
    return value


# ---- routers --------------------------------------------------------------------------------------
def _topk_softmax_router(module, *, always_renorm=False, weights_fp32=False) -> RoutingSpec:
    return RoutingSpec(score_func="softmax", renormalize=always_renorm or bool(module.norm_topk_prob),
                       weights_fp32=weights_fp32)


def _deepseek_v2_router(module) -> RoutingSpec | None:
    if module.topk_method not in ("greedy", "group_limited_greedy"):
        return None
    groups = module.num_group if module.topk_method == "group_limited_greedy" else 1
    return RoutingSpec(score_func="softmax", scale=float(module.routed_scaling_factor), logits_fp32=True,
                       weights_fp32=True, num_groups=groups, topk_groups=module.topk_group if groups > 1 else 1,
                       group_score="max", group_mask_value="zero")


def _deepseek_v3_router(module) -> RoutingSpec:
    return RoutingSpec(score_func="sigmoid", score_bias=True, num_groups=module.num_group,
                       topk_groups=module.topk_group, group_score="top2_sum", group_mask_value="-inf",
                       renormalize=bool(module.norm_topk_prob), renorm_eps=1e-20,
                       scale=float(module.routed_scaling_factor), logits_fp32=True, weights_fp32=True)


def _mistral4_router(module) -> RoutingSpec:
    """DeepSeek-V3's groups (two best summed) on softmax scores in the model's dtype, excluded groups set to 0."""
    return RoutingSpec(score_func="softmax", num_groups=module.num_group, topk_groups=module.topk_group,
                       group_score="top2_sum", group_mask_value="zero", renormalize=bool(module.norm_topk_prob),
                       renorm_eps=1e-20, scale=float(module.routed_scaling_factor), softmax_in_logits_dtype=True)


ROUTERS = {
    "OlmoeTopKRouter": _topk_softmax_router,
    "Qwen2MoeTopKRouter": _topk_softmax_router,
    "Qwen3MoeTopKRouter": _topk_softmax_router,
    "MixtralTopKRouter": functools.partial(_topk_softmax_router, always_renorm=True, weights_fp32=True),
    "Qwen3_5MoeTopKRouter": functools.partial(_topk_softmax_router, always_renorm=True),  # Qwen3's, always renormalised
    "DeepseekV2TopkRouter": _deepseek_v2_router,
    "DeepseekV3TopkRouter": _deepseek_v3_router,
    "GptOssTopKRouter": lambda m: RoutingSpec(score_func="softmax", score_after_topk=True, router_bias=True),
    "AriaTextTopKRouter": lambda m: RoutingSpec(score_func="softmax", score_after_topk=True),  # GPT-OSS's, no bias
    "Mistral4TopkRouter": _mistral4_router,
    "PhimoeTopKRouter": lambda m: (RoutingSpec(score_func="sparsemixer", jitter_eps=float(m.router_jitter_noise))
                                   if m.top_k == 2 else None),  # sparsemixer picks two experts, whatever top_k says
}
"""Router class name -> function reading its RoutingSpec from the module (None: not expressible)."""


def _router_slots(routing: RoutingSpec) -> tuple[tuple[str, str], ...]:
    """(slot, module attribute) pairs of the router's tensors."""
    slots = [("router_weight", "weight")]
    if routing.router_bias:
        slots.append(("router_bias", "bias"))
    if routing.score_bias:
        slots.append(("score_bias", "e_score_correction_bias"))
    return tuple(slots)


_ROUTER_FACTS = ("top_k", "norm_topk_prob", "topk_method", "num_group", "topk_group", "routed_scaling_factor",
                 "router_jitter_noise")
_RANDOM_WHEN_TRAINING = {"PhimoeTopKRouter"}
"""Routers that sample (Gumbel) in training mode: there they keep their own forward."""


def _router_facts(module) -> tuple:
    """The attributes the router readers use, as plain constants (read in traced code: no graph break); every
    router has top_k, the others may be absent (None)."""
    return (module.top_k, *[getattr(module, name, None) for name in _ROUTER_FACTS[1:]])


@constant_plan
def router_plan(class_name: str, weight_shape: tuple, facts: tuple) -> tuple[str, tuple[str, ...]] | None:
    """(spec JSON, attribute names of its tensors) for a known router; computed once at trace time.

    ``assume_constant_result`` makes dynamo call this eagerly and bake the answer in as a constant, so
    building the spec costs no graph break. Its arguments are plain constants (torch 2.11 accepts no
    module here).
    """
    module = types.SimpleNamespace(**dict(zip(_ROUTER_FACTS, facts)))
    routing = ROUTERS[class_name](module)
    if routing is None:
        return None
    slots = _router_slots(routing)
    E, H = weight_shape
    spec = MoESpec(name="router", num_experts=E, top_k=module.top_k, hidden=H, intermediate=0,
                   routing=routing, slots=tuple(s for s, _ in slots))
    return spec.to_json(), tuple(a for _, a in slots)


def route_forward(self, hidden_states, kind: str):
    """The router's forward as one ``dualsparse.route`` call; ``kind``: the ``ROUTERS`` class whose reader describes
    this class (its own name, or the known router whose code it copies: ``_router_classes``)."""
    plan = None if self.training and kind in _RANDOM_WHEN_TRAINING else router_plan(
        kind, tuple(self.weight.shape), _router_facts(self))
    if plan is None:
        return _ORIGINAL_FORWARDS[type(self)](self, hidden_states)
    spec_json, attributes = plan
    params = [getattr(self, a) for a in attributes]
    return torch.ops.dualsparse.route(hidden_states.reshape(-1, self.weight.shape[1]), params, spec_json)


@functools.lru_cache(maxsize=None)
def _route_forward_as(kind: str):
    """``route_forward`` with ``kind`` bound, as a plain function (so that it binds as a method)."""
    def forward(self, hidden_states):
        return route_forward(self, hidden_states, kind)

    return forward


# ---- experts --------------------------------------------------------------------------------------
_EXPERTS_FACTS = ("gate_kind", "act_name", "has_gate", "has_post_expert_norm", "_is_expert_parallel",
                  "is_concatenated", "is_transposed", "has_bias", "alpha", "limit", "gate_limit",
                  "dualsparse_num_experts", "dualsparse_expert_offset")
"""The last two are set by ``runtime.dist.shard_experts_`` (global E, first expert held); None, 0 otherwise."""


@dataclasses.dataclass(frozen=True)
class GateForm:
    """What an experts class's own ``_apply_gate`` computes, in ``ExpertsSpec`` terms."""

    activation: str | None = None
    """None: the module's ``act_fn`` (as the default gate)."""
    clamp: str = "none"
    limit: str = "limit"
    """The module attribute holding the clamp limit ..."""
    alpha: str = "alpha"
    """... and GPT-OSS's alpha (dotted names read through submodules)."""
    gate_limit: str = ""
    """The attribute holding a softcapped gate's cap (``ExpertsSpec.gate_limit``)."""
    glu_fp32: bool = False
    act_names: tuple[str, ...] = ()
    """Where the gate hands both products to ``act_fn``, the activation classes whose computation this form states
    (the gate's code alone does not say what ``act_fn`` does); empty: any ``_ACTIVATIONS`` class."""


_GATES = {
    ("gpt_oss", "GptOssExperts"): GateForm(activation="gptoss"),
    ("openai_privacy_filter", "OpenAIPrivacyFilterExperts"): GateForm(activation="gptoss"),  # not interleaved
    ("minimax_m3_vl", "MiniMaxM3VLExperts"): GateForm(activation="gptoss", limit="swiglu_limit", alpha="swiglu_alpha"),
    ("deepseek_v4", "DeepseekV4Experts"): GateForm(clamp="before"),
    ("hy_v4", "HYV4Experts"): GateForm(activation="silu", clamp="before", limit="swiglu_limit"),
    ("step3p7", "Step3p7Experts"): GateForm(clamp="after"),
    ("beam", "BeamExperts"): GateForm(glu_fp32=True),
    ("inkling2", "Inkling2Experts"): GateForm(
        activation="silu", clamp="softcap", limit="act_fn.up_softcap.softcap", gate_limit="act_fn.gate_softcap.softcap",
        glu_fp32=True, act_names=("Inkling2SoftcappedSwiGLU", "Inkling2LoopSoftcappedSwiGLU")),
}
"""(model folder, experts class) -> what its ``_apply_gate`` computes. A class of another loaded modeling module whose
``_apply_gate`` has the same code (``_gate_key``) is read the same way (GLM-5-Next and HY-V4-VL copy HY-V4's)."""
_GATE_OF_CLASS: dict[str, tuple[str, str]] = {}
"""``module.qualname`` of a loaded experts class with its own gate -> its ``_GATES`` key; filled outside tracing."""


def _gate_kind(module) -> str:
    cls = type(module)
    if cls._apply_gate is _default_apply_gate():
        return "default"
    known = _GATE_OF_CLASS.get(f"{cls.__module__}.{cls.__qualname__}")
    return "/".join(known) if known is not None else "custom:" + cls.__name__


def _gate_form(kind: str) -> GateForm | None:
    return GateForm() if kind == "default" else _GATES.get(tuple(kind.split("/")))


def refresh_gates() -> None:
    """Find the experts classes of the loaded transformers modeling modules whose ``_apply_gate`` is a known one
    (``_GATES``), by their code. Entered before tracing and describing: cached on the number of loaded modules."""
    _GATE_OF_CLASS.update(_gates_with_modules(len(sys.modules)))


@functools.lru_cache(maxsize=8)
def _gates_with_modules(count: int) -> dict[str, tuple[str, str]]:
    found = {}
    for module_name in [m for m in list(sys.modules) if m.startswith("transformers.models.") and ".modeling_" in m]:
        for cls in list(vars(sys.modules[module_name]).values()):
            if isinstance(cls, type) and cls.__module__ == module_name and "_apply_gate" in vars(cls):
                folder = module_name.split(".")[2]
                # a _GATES class itself, else (importing the _GATES modules once) one with the same code
                key = (folder, cls.__name__) if (folder, cls.__name__) in _GATES else _known_gate_keys().get(
                    _gate_key(cls))
                if key is not None:
                    found[f"{module_name}.{cls.__qualname__}"] = key
    return found


@functools.lru_cache(maxsize=None)
def _known_gate_keys() -> dict[str, tuple[str, str]]:
    """``_gate_key`` of each ``_GATES`` class this transformers version has -> its ``_GATES`` key."""
    keys = {}
    for folder, name in _GATES:
        try:
            cls = getattr(__import__(f"transformers.models.{folder}.modeling_{folder}", fromlist=[name]), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and _gate_key(cls) is not None:
            keys.setdefault(_gate_key(cls), (folder, name))
    return keys


def _gate_key(cls) -> str | None:
    try:
        return _normalised(inspect.getsource(vars(cls)["_apply_gate"]), cls.__name__)
    except (OSError, TypeError):
        return None


def _activation_name(act) -> str:
    """The class name ``_ACTIVATIONS`` knows for an activation module, or for torch's own functions (a model may set
    ``act_fn = F.silu``); any other function is "function", which nothing matches. Identity tests only: this runs
    in traced code."""
    if act is F.silu:
        return "SiLU"
    if act is F.relu or act is torch.relu:
        return "ReLU"
    if act is F.gelu:  # approximate="none" unless the caller passes it; a module would hold a partial instead
        return "GELUActivation"
    return type(act).__name__


def _experts_facts(module) -> tuple:
    """What ``describe_experts`` needs, as plain constants (read in traced code: no graph break)."""
    kind = _gate_kind(module)
    form = _gate_form(kind) or GateForm()
    return (kind, _activation_name(getattr(module, "act_fn", None)), getattr(module, "has_gate", True),
            getattr(module, "has_post_expert_norm", False), getattr(module, "_is_expert_parallel", False),
            module.is_concatenated, module.is_transposed, module.has_bias,
            float(_attribute(module, form.alpha, 1.702)), float(_attribute(module, form.limit, 7.0)),
            float(_attribute(module, form.gate_limit, 0.0)),
            getattr(module, "dualsparse_num_experts", None), int(getattr(module, "dualsparse_expert_offset", 0)))


def _attribute(module, dotted: str, default):
    for name in dotted.split(".") if dotted else ():
        module = getattr(module, name, None)
    return default if module is None or not dotted else module


_DEFAULT_GATE = None


def _default_apply_gate():
    """transformers' default GLU gate; set by ``_install`` before tracing, so traced code only reads a global."""
    global _DEFAULT_GATE
    if _DEFAULT_GATE is None:
        from transformers.integrations.moe import _default_apply_gate as gate

        _DEFAULT_GATE = gate
    return _DEFAULT_GATE


def describe_experts(module) -> ExpertsSpec | str:
    """The ExpertsSpec of a transformers experts module (decorated with ``use_experts_implementation``, or the
    experts of a block we patch: ``_BLOCK_EXPERTS``), or the reason it cannot be described."""
    reader = _BLOCK_EXPERTS.get(type(module).__name__)
    if reader is not None:
        return reader(module)
    if not hasattr(module, "is_concatenated"):
        return f"{type(module).__name__} is not a transformers experts module (use_experts_implementation)"
    refresh_gates()
    return describe_facts(dict(zip(_EXPERTS_FACTS, _experts_facts(module))))


def describe_facts(f: dict) -> ExpertsSpec | str:
    if f["has_post_expert_norm"]:
        return "experts with a post-expert norm"
    if f["_is_expert_parallel"]:
        return "experts already sharded for expert parallelism"
    if not f["has_gate"]:  # NemotronH: down(act(up x)); the gate function is never called
        activation = _ACTIVATIONS.get(f["act_name"])
        if f["has_bias"]:
            return "experts without a gate, with biases"
        if activation is None:
            return f"experts without a gate, activation {f['act_name']} not supported"
        return ExpertsSpec(layout="separate", gated=False, transposed=f["is_transposed"], activation=activation)
    form = _gate_form(f["gate_kind"])
    if form is None:
        return f"custom gate function ({f['gate_kind']})"
    if form.act_names and f["act_name"] not in form.act_names:
        return f"custom gate function ({f['gate_kind']} with {f['act_name']})"
    activation = form.activation or _ACTIVATIONS.get(f["act_name"])
    if activation is None:
        return f"activation {f['act_name']} not supported"
    return ExpertsSpec(layout="fused", interleaved=not f["is_concatenated"], transposed=f["is_transposed"],
                       has_bias=f["has_bias"], activation=activation, alpha=f["alpha"], limit=f["limit"],
                       clamp=form.clamp, gate_limit=f["gate_limit"], glu_fp32=form.glu_fp32)


def _held_experts(described: ExpertsSpec | str, reason: str | None, sharded_from: int | None,
                  held: int) -> ExpertsSpec | str:
    """A block's experts (a transformers experts module's, a patched block's): ``reason`` when it is left alone, else
    ``described``, holding experts ``sharded_from`` .. ``sharded_from + held - 1`` if ``runtime.dist.shard_experts_``
    sharded it. A sharded block cannot be left alone (its own code would index the held weights by global expert
    ids): that raises."""
    if reason is not None and sharded_from is not None:
        raise RuntimeError(f"dualsparse: {reason}; its experts were sharded by shard_experts_ and only the "
                           "expert-parallel operators can run them")
    if reason is not None:
        return reason
    if sharded_from is None:
        return described
    return dataclasses.replace(described, expert_offset=sharded_from, local_experts=held)


@constant_plan
def experts_plan(class_name: str, facts: tuple, gate_up_shape: tuple, top_k: int) -> tuple[str, tuple[str, ...]] | str:
    """(spec JSON, attribute names of its tensors), or the reason the module is left alone."""
    f = dict(zip(_EXPERTS_FACTS, facts))
    described = describe_facts(f)
    reason = None
    if isinstance(described, str):
        reason = f"{class_name}: {described}"
    elif len(gate_up_shape) != 3:
        reason = f"{class_name}: no 3-D {'gate_up_proj' if described.gated else 'up_proj'}"
    sharded = f["dualsparse_num_experts"] is not None  # E is the global count, the weights hold offset .. + held - 1
    described = _held_experts(described, reason, f["dualsparse_expert_offset"] if sharded else None,
                              gate_up_shape[0] if gate_up_shape else 0)
    if isinstance(described, str):
        return described
    num_experts = int(f["dualsparse_num_experts"]) if sharded else gate_up_shape[0]
    slots = [("gate_up", "gate_up_proj"), ("down", "down_proj")] if described.gated else [("up", "up_proj"),
                                                                                             ("down", "down_proj")]
    if described.has_bias:
        slots += [("gate_up_bias", "gate_up_proj_bias"), ("down_bias", "down_proj_bias")]
    hidden, inter2 = (gate_up_shape[1], gate_up_shape[2]) if described.transposed else (gate_up_shape[2], gate_up_shape[1])
    spec = MoESpec(name="experts", num_experts=num_experts, top_k=top_k, hidden=hidden,
                   intermediate=inter2 // 2 if described.gated else inter2,
                   experts=described, slots=tuple(s for s, _ in slots))
    return spec.to_json(), tuple(a for _, a in slots)


def experts_forward(self, hidden_states, top_k_index, top_k_weights, *, fallback):
    # the first projection: gate_up_proj, or up_proj alone without a gate (has_gate=False)
    first = getattr(self, "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj", None)
    plan = experts_plan(type(self).__name__, _experts_facts(self), tuple(first.shape) if first is not None else (),
                        top_k_index.shape[-1])
    if isinstance(plan, str):
        out = fallback(self, hidden_states, top_k_index, top_k_weights)
        return torch.ops.dualsparse.left_alone(out, plan)
    spec_json, attributes = plan
    params = [getattr(self, a) for a in attributes]
    return torch.ops.dualsparse.experts(hidden_states, top_k_index, top_k_weights, params, spec_json)


# ---- blocks with experts of their own --------------------------------------------------------------
@constant_plan
def llama4_plan(act_name: str, router_bias: bool, gate_up_shape: tuple, top_k: int) -> tuple[str, str] | str:
    """(route spec JSON, experts spec JSON) of a Llama-4 MoE block, or the reason it is left alone.

    Llama-4 routes by the top-k logits, each weight the fp32 sigmoid of its logit cast back, and runs expert e on
    weight * x (``Llama4TextMoe.forward``: non-selected experts see 0 and, without biases, add exactly 0)."""
    activation = _ACTIVATIONS.get(act_name)
    if router_bias:
        return "Llama4TextMoe: a router bias not supported"
    if activation is None:
        return f"Llama4TextMoe: activation {act_name} not supported"
    if len(gate_up_shape) != 3:
        return "Llama4TextMoe: no 3-D gate_up_proj"
    E, H, inter2 = gate_up_shape
    routing = RoutingSpec(score_func="sigmoid", score_after_topk=True, scores_fp32=True)
    route = MoESpec(name="router", num_experts=E, top_k=top_k, hidden=H, intermediate=0, routing=routing,
                    slots=("router_weight",))
    experts = MoESpec(name="experts", num_experts=E, top_k=top_k, hidden=H, intermediate=inter2 // 2,
                      experts=ExpertsSpec(layout="fused", transposed=True, activation=activation, weight_on_input=True),
                      slots=("gate_up", "down"))
    return route.to_json(), experts.to_json()


def llama4_moe_forward(self, hidden_states):
    """``Llama4TextMoe.forward`` as route + experts markers (then one ``dualsparse.moe`` with the shared expert
    folded in); returns (output, router logits) as the original does."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    plan = llama4_plan(_activation_name(self.experts.act_fn), self.router.bias is not None,
                       tuple(self.experts.gate_up_proj.shape), self.top_k)
    if isinstance(plan, str):
        out, logits = _ORIGINAL_FORWARDS[type(self)](self, hidden_states)
        return torch.ops.dualsparse.left_alone(out, plan), logits
    route_json, experts_json = plan
    logits, weights, index = torch.ops.dualsparse.route(x, [self.router.weight], route_json)
    routed = torch.ops.dualsparse.experts(x, index, weights, [self.experts.gate_up_proj, self.experts.down_proj],
                                          experts_json)
    return self.shared_expert(x) + routed, logits


def _known_experts(act_name: str, layout: str) -> ExpertsSpec | str:
    """The ExpertsSpec of a patched block's experts (LongCat-Flash's fused, DBRX's separate), or why not."""
    activation = _ACTIVATIONS.get(act_name)
    if activation is None:
        return f"activation {act_name} not supported"
    return ExpertsSpec(layout=layout, activation=activation)


@constant_plan
def longcat_plan(act_name: str, routed_experts: int, gate_up_shape: tuple, down_shape: tuple, top_k: int,
                 sharded_from: int | None = None) -> str:
    """Experts spec JSON of a LongCat-Flash MoE block's routed experts, or why it is left alone (a string starting
    with "LongcatFlashMoE:"). Its gate_up_proj holds rows for the zero-computation experts too; the operator reads
    the first ``routed_experts`` of them, as transformers' loop does. ``sharded_from``: the first expert held by a
    module that ``runtime.dist.shard_experts_`` sharded (then the weights hold ``down_shape[0]`` experts)."""
    described = _known_experts(act_name, "fused")
    reason = None
    if isinstance(described, str) or routed_experts == 0 or len(gate_up_shape) != 3 or len(down_shape) != 3:
        reason = f"LongcatFlashMoE: {described if isinstance(described, str) else 'no 3-D routed experts'}"
    described = _held_experts(described, reason, sharded_from, down_shape[0] if down_shape else 0)
    if isinstance(described, str):
        return described
    spec = MoESpec(name="experts", num_experts=routed_experts, top_k=top_k, hidden=down_shape[1],
                   intermediate=down_shape[2], experts=described, slots=("gate_up", "down"),
                   routing=RoutingSpec(score_func="given", absent_ids=True))  # ids of zero-computation experts
    return spec.to_json()


def longcat_moe_forward(self, hidden_states):
    """``LongcatFlashMoE.forward`` with its routed experts as one operator. A pair routed to a zero-computation
    expert (id >= n_routed_experts) adds weight * x; the operator takes the ids as given, where such an id adds
    nothing (``reference.route``), and the identity pairs' weights are summed beside it as plain ops."""
    experts = self.experts
    routed_experts = experts.num_routed_experts
    plan = longcat_plan(_activation_name(experts.act_fn), routed_experts,
                        tuple(experts.gate_up_proj.shape) if experts.gate_up_proj is not None else (),
                        tuple(experts.down_proj.shape) if experts.down_proj is not None else (), self.router.top_k,
                        getattr(experts, "dualsparse_expert_offset", None))
    if not plan.startswith("{"):
        return torch.ops.dualsparse.left_alone(_ORIGINAL_FORWARDS[type(self)](self, hidden_states), plan)
    weights, index = self.router(hidden_states)[-2:]  # (logits,) weights, ids: transformers 5.17 returns no logits
    x = hidden_states.view(-1, hidden_states.shape[-1])
    routed = torch.ops.dualsparse.experts(x, index, weights, [experts.gate_up_proj, experts.down_proj], plan)
    identity = (weights * (index >= routed_experts)).sum(dim=-1, keepdim=True)
    return (routed + (x * identity).to(x.dtype)).view(hidden_states.shape)


@constant_plan
def jetmoe_plan(act_name: str, input_shape: tuple, output_shape: tuple, experts: int, top_k: int,
                sharded_from: int | None = None) -> tuple[str, str] | str:
    """(route spec JSON, experts spec JSON) of a JetMoE MoE block, or why it is left alone.

    JetMoE routes by the top-k of its (input-dtype) logits, weighted by the fp32 softmax of those k cast back
    (``JetMoeTopKGating``), and its experts are two ``JetMoeParallelExperts``: [E, 2I, H] (gate; up concatenated)
    and [E, H, I], the fused layout; its bias is added after the sum (plain op). ``sharded_from``: the first of the
    experts a block ``runtime.dist.shard_experts_`` sharded holds (``input_shape[0]`` of the ``experts``)."""
    described = _known_experts(act_name, "fused")
    if isinstance(described, str):
        reason = f"JetMoeMoE: {described}"
    elif len(input_shape) != 3 or len(output_shape) != 3 or input_shape[0] != output_shape[0]:
        reason = "JetMoeMoE: experts of unexpected shapes"
    else:
        reason = None
    described = _held_experts(described, reason, sharded_from, input_shape[0] if input_shape else 0)
    if isinstance(described, str):
        return described
    _, inter2, H = input_shape
    route = MoESpec(name="router", num_experts=experts, top_k=top_k, hidden=H, intermediate=0,
                    routing=RoutingSpec(score_after_topk=True, scores_fp32=True), slots=("router_weight",))
    spec = MoESpec(name="experts", num_experts=experts, top_k=top_k, hidden=H, intermediate=inter2 // 2,
                   experts=described, slots=("gate_up", "down"))
    return route.to_json(), spec.to_json()


def _jetmoe_plan_of(block) -> tuple[str, str] | str:
    return jetmoe_plan(_activation_name(block.activation), tuple(block.input_linear.weight.shape),
                       tuple(block.output_linear.weight.shape), block.router.num_experts, block.router.top_k,
                       getattr(block, "dualsparse_expert_offset", None))


def jetmoe_expert_tensors(block) -> dict[str, torch.Tensor]:
    """A ``JetMoeMoE``'s experts by operator slot: input_linear [E, 2I, H] (gate; up) and output_linear [E, H, I]."""
    return {"gate_up": block.input_linear.weight, "down": block.output_linear.weight}


def jetmoe_routing(block, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], expert ids [T, k], weights [T, k]) of one ``JetMoeMoE`` call, from its arguments: the route
    spec of ``jetmoe_plan`` on its router, which reproduces the block's routing bit for bit
    (tests/test_capture_given.py::test_jetmoe_block_is_captured_exactly)."""
    from dsmoe_compiler.codegen import reference

    x = args[0] if args else kwargs["layer_input"]
    x = x.reshape(-1, x.shape[-1])
    route_json, _ = _jetmoe_plan_of(block)
    _, weights, index = reference.route(x, [block.router.layer.weight], reference.parse_spec(route_json))
    return x, index, weights


def jetmoe_moe_forward(self, layer_input):
    """``JetMoeMoE.forward`` as route + experts markers (one ``dualsparse.moe``), its bias added after."""
    batch, length, hidden = layer_input.size()
    x = layer_input.reshape(-1, hidden)
    plan = _jetmoe_plan_of(self)
    if isinstance(plan, str):
        return torch.ops.dualsparse.left_alone(_ORIGINAL_FORWARDS[type(self)](self, layer_input), plan)
    route_json, experts_json = plan
    _, weights, index = torch.ops.dualsparse.route(x, [self.router.layer.weight], route_json)
    routed = torch.ops.dualsparse.experts(x, index, weights, [self.input_linear.weight, self.output_linear.weight],
                                          experts_json)
    return routed.view(batch, length, hidden) + self.bias


@constant_plan
def dbrx_plan(act_name: str, norm_p, jitter: bool, experts: int, inter: int, hidden: int, top_k: int,
              held: int, sharded_from: int | None = None) -> tuple[str | None, str] | str:
    """(route spec JSON or None for given routing, experts spec JSON) of a DBRX FFN, or why it is left alone.

    DBRX routes by a softmax over all experts, its top-k weights divided by their p-norm
    (``moe_normalize_expert_weights``): p = 1 is the sum of the (positive) weights, renormalisation; no p, none; another
    p is routed by DBRX's own ops and the operator takes that routing as given. Its experts are 2-D [E I, H] tensors:
    w1 (gate) and v1 (up) hold each expert's [I, H] rows as [out, in], w2 holds its [I, H] as [in, out] (``h @ w2``),
    so the operator reads w1, v1 as the separate layout and w2 through a transposed view (no copy: the kernels read
    strides). ``sharded_from``: the first of the ``held`` experts of a module ``runtime.dist.shard_experts_`` sharded."""
    described = _known_experts(act_name, "separate")
    reason = (f"DbrxFFN: {described}" if isinstance(described, str)
              else "DbrxFFN: router jitter in training mode" if jitter else None)
    described = _held_experts(described, reason, sharded_from, held)
    if isinstance(described, str):
        return described
    route = None
    if norm_p is None or float(norm_p) == 1.0:
        route = MoESpec(name="router", num_experts=experts, top_k=top_k, hidden=hidden, intermediate=0,
                        routing=RoutingSpec(score_func="softmax", renormalize=norm_p is not None,
                                            softmax_in_logits_dtype=True),
                        slots=("router_weight",)).to_json()
    spec = MoESpec(name="experts", num_experts=experts, top_k=top_k, hidden=hidden, intermediate=inter,
                   experts=described, slots=("gate", "up", "down"))
    return route, spec.to_json()


def dbrx_moe_forward(self, hidden_states):
    """``DbrxFFN.forward`` as route + experts markers (one ``dualsparse.moe``); a p-norm other than 1 is routed by
    DBRX's own ``route_tokens_to_experts`` and given to the operator."""
    experts = self.experts
    E, I, H = experts.num_experts, experts.ffn_hidden_size, experts.hidden_size
    tensors = dbrx_expert_tensors(experts)
    plan = dbrx_plan(_activation_name(experts.mlp.activation_fn), self.moe_normalize_expert_weights,
                     self.training and self.router.moe_jitter_eps is not None, E, I, H, self.top_k,
                     tensors["down"].shape[0], getattr(experts, "dualsparse_expert_offset", None))
    if isinstance(plan, str):
        return torch.ops.dualsparse.left_alone(_ORIGINAL_FORWARDS[type(self)](self, hidden_states), plan)
    route_json, experts_json = plan
    x = hidden_states.reshape(-1, H)
    if route_json is None:
        weights, index = self.route_tokens_to_experts(self.router(x))
    else:
        _, weights, index = torch.ops.dualsparse.route(x, [self.router.layer.weight], route_json)
    return torch.ops.dualsparse.experts(x, index, weights, list(tensors.values()), experts_json).view(
        hidden_states.shape)


def dbrx_expert_tensors(experts) -> dict[str, torch.Tensor]:
    """A ``DbrxExperts``' 2-D [E I, H] weights as the operator's separate-layout slots, views (no copy): w1 and v1 hold
    each expert's [I, H] gate and up rows as [out, in], w2 its down projection as [in, out] (read transposed)."""
    mlp, I = experts.mlp, experts.ffn_hidden_size
    shape = (mlp.w1.shape[0] // I, I, experts.hidden_size)  # the experts held (a sharded module holds some)
    return {"gate": mlp.w1.view(shape), "up": mlp.v1.view(shape), "down": mlp.w2.view(shape).transpose(1, 2)}


def shard_jetmoe_experts_(block, first: int, last: int) -> None:
    """Keep experts first .. last - 1 of a ``JetMoeMoE`` (``runtime.dist.shard_experts_``): of its two
    ``JetMoeParallelExperts``' [E, out, in] weights."""
    from dsmoe_compiler.runtime.dist import keep_rows_

    keep_rows_(block.input_linear, ("weight",), first, last)
    keep_rows_(block.output_linear, ("weight",), first, last)


def shard_dbrx_experts_(experts, first: int, last: int) -> None:
    """Keep experts first .. last - 1 of a ``DbrxExperts`` (``runtime.dist.shard_experts_``): rows [first I, last I) of
    w1, v1 and w2."""
    from dsmoe_compiler.runtime.dist import keep_rows_

    I = experts.ffn_hidden_size
    keep_rows_(experts.mlp, ("w1", "v1", "w2"), first * I, last * I)


_BLOCKS = {("llama4", "Llama4TextMoe"): llama4_moe_forward, ("longcat_flash", "LongcatFlashMoE"): longcat_moe_forward,
           ("jetmoe", "JetMoeMoE"): jetmoe_moe_forward, ("dbrx", "DbrxFFN"): dbrx_moe_forward}
"""(model folder, block class) -> our forward for it, patched where that modeling module is loaded."""
_BLOCK_EXPERTS = {"LongcatFlashExperts": lambda module: _known_experts(_activation_name(module.act_fn), "fused"),
                  "DbrxExperts": lambda module: _known_experts(_activation_name(module.mlp.activation_fn), "separate"),
                  "JetMoeMoE": lambda block: _known_experts(_activation_name(block.activation), "fused")}
"""Experts classes of the ``_BLOCKS`` without transformers' decorator -> their ``describe_experts`` (for sharding and
calibration)."""
EXPERT_TENSORS = {"DbrxExperts": dbrx_expert_tensors, "JetMoeMoE": jetmoe_expert_tensors}
"""Experts classes whose weights are not transformers' ``gate_up_proj`` / ``down_proj`` -> their slot tensors."""
BLOCK_ROUTING = {"JetMoeMoE": jetmoe_routing}
"""Experts that are the whole MoE block, router inside (its forward takes the hidden states) -> (hidden, expert ids,
weights) of one call's (args, kwargs), as transformers' experts modules take them (for calibration)."""
EXPERT_SHARDERS = {"DbrxExperts": shard_dbrx_experts_, "JetMoeMoE": shard_jetmoe_experts_}
"""The same classes -> how ``runtime.dist.shard_experts_`` keeps experts first .. last - 1 of one, in place."""


def _block_classes():
    for (folder, name), forward in _BLOCKS.items():
        module = sys.modules.get(f"transformers.models.{folder}.modeling_{folder}")
        cls = getattr(module, name, None)
        if cls is not None:
            yield cls, forward


# ---- the scoped patch -----------------------------------------------------------------------------
_ORIGINAL_FORWARDS: dict[type, object] = {}
_lock = threading.Lock()
_depth = 0


_ROUTER_HOMES = ("olmoe", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss",
                 "aria", "mistral4", "phimoe")
"""The model folders of the ``ROUTERS`` classes."""


def _router_classes() -> tuple[tuple[type, str], ...]:
    """(router class, the ``ROUTERS`` name whose reader describes it): the known classes themselves, and every class
    of a loaded transformers modeling module whose code equals one of theirs (``_code_key``). Many models copy a
    router verbatim under their own name (GLM-4-MoE, dots1, Kimi-Linear, ... share DeepSeek-V3's; Qwen3-Next and
    FlexOlmo Olmoe's; MiniMax Mixtral's), so the same reader describes them exactly. Entered on every call of a
    compiled model: cached on the number of loaded modules."""
    return _routers_with_modules(len(sys.modules))


@functools.lru_cache(maxsize=8)
def _routers_with_modules(count: int) -> tuple[tuple[type, str], ...]:
    modeling = [name for name in list(sys.modules) if name.startswith("transformers.models.")
                and ".modeling_" in name and name.split(".")[2] not in _ROUTER_HOMES]
    return _known_routers() + tuple(a for m in modeling for a in _routers_in(m))


@functools.lru_cache(maxsize=None)
def _known_routers() -> tuple[tuple[type, str], ...]:
    return tuple((cls, cls.__name__) for cls in _find_router_classes())


def _find_router_classes():
    import transformers

    for name in ROUTERS:
        for module_name in _ROUTER_HOMES:
            cls = getattr(getattr(transformers.models, module_name, None), name, None)
            if cls is None:
                try:
                    mod = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[name])
                except ImportError:
                    continue
                cls = getattr(mod, name, None)
            if cls is not None:
                yield cls
                break


@functools.lru_cache(maxsize=None)
def _known_keys() -> dict[str, str]:
    keys = {}
    for cls, name in _known_routers():
        key = _code_key(cls)
        if key is not None:
            keys.setdefault(key, name)
    return keys


@functools.lru_cache(maxsize=None)
def _routers_in(module_name: str) -> tuple[tuple[type, str], ...]:
    module = sys.modules.get(module_name)
    if module is None:
        return ()
    found = []
    for cls in list(vars(module).values()):
        if (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module_name
                and "forward" in vars(cls)):
            kind = _known_keys().get(_code_key(cls))
            if kind is not None:
                found.append((cls, kind))
    return tuple(found)


def _code_key(cls) -> str | None:
    """What a router class computes, as text: the source of its own methods other than ``__init__`` and of the
    module-level functions they call, whitespace-normalised, with the class's name replaced; None if any source is
    missing. Equal keys: the same computation on the same attributes (``__init__`` may read other config names)."""
    methods = {n: f for n, f in vars(cls).items() if inspect.isfunction(f) and n != "__init__"}
    parts = []
    try:
        for name in sorted(methods):
            parts.append(_normalised(inspect.getsource(methods[name]), cls.__name__))
            for helper in sorted(set(methods[name].__code__.co_names)):
                value = methods[name].__globals__.get(helper)
                if inspect.isfunction(value) and value.__module__ == cls.__module__:
                    parts.append(_normalised(inspect.getsource(value), cls.__name__))
    except (OSError, TypeError):
        return None
    return "\n".join(parts) if parts else None


def _normalised(source: str, class_name: str) -> str:
    return " ".join(source.replace(class_name, "<cls>").split())


def _patched_get_interface(original):
    @functools.wraps(original)
    def get_interface(self, experts_implementation, default):
        fallback = original(self, experts_implementation, default)
        return functools.partial(experts_forward, fallback=fallback)

    return get_interface


class TransformersCapture:
    """Context manager applying the patches (re-entrant, counted)."""

    def __enter__(self):
        global _depth
        with _lock:
            _depth += 1
            if _depth == 1:
                _install()
        return self

    def __exit__(self, *exc):
        global _depth
        with _lock:
            _depth -= 1
            if _depth == 0:
                _uninstall()
        return False


def _transformers_moe():
    if "transformers" not in sys.modules:  # a model not built with transformers: nothing to patch
        return None
    try:
        from transformers.integrations import moe
    except ImportError:  # transformers not installed: nothing to patch
        return None
    return moe


def _install():
    moe = _transformers_moe()
    if moe is None:
        return
    _default_apply_gate()
    refresh_gates()
    _ORIGINAL_FORWARDS["get_interface"] = moe.ExpertsInterface.get_interface
    moe.ExpertsInterface.get_interface = _patched_get_interface(moe.ExpertsInterface.get_interface)
    for cls, kind in _router_classes():
        _ORIGINAL_FORWARDS[cls] = cls.forward
        cls.forward = _route_forward_as(kind)
    for cls, forward in _block_classes():
        _ORIGINAL_FORWARDS[cls] = cls.forward
        cls.forward = forward


def _uninstall():
    moe = _transformers_moe()
    if moe is None:
        return
    moe.ExpertsInterface.get_interface = _ORIGINAL_FORWARDS.pop("get_interface")
    for cls in [c for c in _ORIGINAL_FORWARDS if isinstance(c, type)]:
        cls.forward = _ORIGINAL_FORWARDS.pop(cls)
