"""Recognisers: FX graph (or module) -> MoESpec, one file per form."""
