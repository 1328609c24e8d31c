"""Passes on the MoE operator: each takes (gm, options, report) and returns whether it changed the graph."""

PASSES = []
