"""Kernels for the MoE operator; reference.py is the semantics every kernel is tested against."""
