"""Passes on the MoE operator: each takes (gm, options, report) and returns whether it changed the graph."""

from dsmoe_compiler.passes.drop import drop_pass
from dsmoe_compiler.passes.expert_parallel import expert_parallel_pass
from dsmoe_compiler.passes.partition import partition_pass
from dsmoe_compiler.passes.reconstruct import reconstruct

PASSES = [
    ("reconstruct", reconstruct),  # before partition: sub-expert p of P becomes the p-th importance tier
    ("partition", partition_pass),
    ("drop", drop_pass),  # after partition: 2T reads the Major/Minor halves
    ("expert_parallel", expert_parallel_pass),  # last: replaces each moe node by route/all_to_all/experts/combine
]
