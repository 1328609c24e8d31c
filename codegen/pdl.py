"""Programmatic dependent launch (Hopper and newer): the next kernel of the chain starts while this one drains.

The operator's kernels run as a chain, each reading what the one before wrote: route → count → scatter →
gate/up → down → combine. Launched normally, each waits for the previous grid to finish and for its own
launch to be processed, and its programs then set up (group table from the counts, descriptors) before
any product. Launched with ``launch_pdl=True``, a kernel's programs may start as soon as every program of
the previous kernel has called ``gdc_launch_dependents`` (or exited), and ``gdc_wait`` holds them until
the previous grid has finished and its writes are visible. So a kernel:

- before ``dependent_wait``, reads only what kernels two or more launches back wrote (they have finished:
  the previous kernel called its own wait before letting this one start) and writes nothing;
- calls ``dependent_wait`` before touching anything else.

Both instructions are no-ops without the launch attribute, so the same binary is correct either way.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def dependent_wait(PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel's programs start launching."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
