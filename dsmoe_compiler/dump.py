"""Debug dumps: every graph before and after each pass as text, and a picture of each MoE subgraph.

Files in ``dump_dir`` (option or env ``DUALSPARSE_DUMP_DIR``): ``graph<N>_<stage>.txt`` with the
readable graph code, and ``graph<N>_moe<i>.png`` drawing the ``dualsparse.moe`` node, its inputs and
users (networkx + matplotlib).
"""

from __future__ import annotations

import os

import torch.fx as fx


class Dumper:
    def __init__(self, directory: str | None, graph_id: int):
        self.directory = directory
        self.graph_id = graph_id
        self.stage = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    def graph(self, gm: fx.GraphModule, stage: str) -> None:
        if not self.directory:
            return
        self.stage += 1
        path = os.path.join(self.directory, f"graph{self.graph_id}_{self.stage:02d}_{stage}.txt")
        with open(path, "w") as f:
            f.write(gm.print_readable(print_output=False))
            f.write("\n\n# ---- nodes ----\n")
            f.write(str(gm.graph))

    def moe_pictures(self, gm: fx.GraphModule) -> None:
        if not self.directory:
            return
        moe_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "dualsparse.moe" in str(n.target)]
        for i, node in enumerate(moe_nodes):
            draw_neighbourhood(node, os.path.join(self.directory, f"graph{self.graph_id}_moe{i}.png"))


def draw_neighbourhood(node: fx.Node, path: str, depth: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = nx.DiGraph()
    frontier, seen = {node}, {node}
    for _ in range(depth):
        nxt = set()
        for n in frontier:
            for m in [*n.all_input_nodes, *n.users]:
                if m not in seen:
                    seen.add(m)
                    nxt.add(m)
        frontier = nxt
    for n in seen:
        for m in n.users:
            if m in seen:
                g.add_edge(_label(n), _label(m))
    fig = plt.figure(figsize=(12, 8))
    pos = nx.spring_layout(g, seed=0)
    colors = ["tab:red" if "moe" in name.split("\n")[0] else "tab:blue" for name in g.nodes]
    nx.draw(g, pos, with_labels=True, node_color=colors, node_size=400, font_size=7, arrows=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _label(n: fx.Node) -> str:
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{n.name}\n{target}"
