"""`rcc explain --graph out.png`: a picture of the schedule a cell runs on a given graph.

Nodes are coloured and labelled by their level (the step that computes them); a grid keeps its
layout, so the wavefront's anti-diagonals show, and a DAG is laid out level by level.
"""
from __future__ import annotations


def draw_schedule(schedule, edges, path, title, grid=None):
    """Write the picture of `schedule` (rcc.runtime.graph.Schedule) to `path`; `edges` are the
    (source, target) pairs; `grid` = (X, Y) lays node i * Y + j out at column j, row i."""
    try:
        import matplotlib
    except ImportError:
        raise NotImplementedError("rcc explain --graph draws with matplotlib, which is not "
                                  "installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import networkx as nx

    level = {}
    for L, lv in enumerate(schedule.levels):
        for v in lv.seq_node.tolist():
            level[v] = L
    graph = nx.DiGraph()
    graph.add_nodes_from((v, {"level": L}) for v, L in level.items())
    graph.add_edges_from(edges)
    if grid is not None:
        pos = {v: (v % grid[1], -(v // grid[1])) for v in graph}
    else:
        pos = nx.multipartite_layout(graph, subset_key="level")
    n = graph.number_of_nodes()
    size = max(6.0, min(16.0, 0.5 * n ** 0.5 + 3))
    fig, ax = plt.subplots(figsize=(size, size * 0.8))
    small = n > 400
    nx.draw_networkx(graph, pos, ax=ax, node_color=[level[v] for v in graph],
                     cmap="viridis", node_size=20 if small else 300, with_labels=not small,
                     labels={v: str(level[v]) for v in graph}, font_size=7, font_color="white",
                     arrows=not small, width=0.4 if small else 1.0, edge_color="#999999")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
