"""rcc.compile: source -> IR -> generated module -> a torch.nn.Module class (cached by content)."""
from __future__ import annotations



from . import frontend
from .elaborate import NeedStatic, elaborate
from .errors import CompileError, require_triton
from .passes import run_pipeline
from .runtime.loader import auto_class, class_for_code

BACKENDS = ("auto", "torch", "cpp", "triton")
AUTO_T, AUTO_N = 4096, 8  # the sizes `generate(plan="auto")` chooses for (no call to see yet)
PLANS = ("auto", "sequential", "scan", "chunk", "newton")


TRITON_PLANS = ("sequential", "scan", "newton", "chunk")


def _check_choice(backend, plan):
    """The backend and plan to print: 'auto' backend is torch; backend 'cpp' runs the fused
    sequential loop, which is what plan 'auto' means there; backend 'triton' resolves plan 'auto'
    once the cell is analysed (_triton_plan)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r} (choose from {', '.join(PLANS)})")
    if backend == "cpp":
        if plan not in ("auto", "sequential"):
            raise NotImplementedError(
                f"backend 'cpp' runs plan 'sequential' (the fused loop over time) only; plan "
                f"{plan!r} runs on backend='torch'")
        return backend, "sequential"
    if backend == "triton":
        require_triton()
        if plan not in ("auto",) + TRITON_PLANS:
            raise NotImplementedError(
                f"backend 'triton' has no kernels for plan {plan!r} yet (it runs "
                f"{', '.join(TRITON_PLANS)}); plan {plan!r} runs on backend='torch'")
        return backend, plan
    return "torch", plan


def _check_graph(cell_ir, backend, plan):
    """The plan a cell over grid2d or dag runs: the level schedule (rcc.runtime.graph) of the
    torch backend, or plan 'chunk' where it applies; else say why not."""
    where = f"cell '{cell_ir.name}' runs over {cell_ir.topology}"
    if backend == "cpp":
        from rcc.backends.cpp.graph import unsupported
        why = unsupported(cell_ir)
        if why:
            raise NotImplementedError(f"{where}: backend 'cpp' runs cells over graphs whose "
                                      f"states are all updated; {why} is not built in it yet: "
                                      "use backend='torch'")
        if plan not in ("auto", "sequential"):
            raise NotImplementedError(f"{where}: backend 'cpp' runs plan 'sequential' (the level "
                                      f"schedule), not {plan!r}")
        return "sequential"
    from .passes.topology import affine_grid
    if backend == "triton":
        # its kernels solve the affine form on grids; the level schedule is torch's or cpp's
        why = affine_grid(cell_ir)
        if plan not in ("auto", "chunk") or why:
            raise NotImplementedError(
                f"{where}: backend 'triton' runs plan 'chunk' over grid2d only (pLSTM's parallel "
                f"form, cells affine in their states){'' if why is None else ': ' + why}; "
                "the level schedule runs on backend='torch' or 'cpp'")
        return "chunk"
    if plan in ("auto", "sequential"):
        return "sequential"
    if plan == "chunk":
        why = affine_grid(cell_ir)
        if why:
            raise NotImplementedError(f"{where}: plan 'chunk' cannot run it: {why}")
        return plan
    raise NotImplementedError(f"{where}: plan {plan!r} has no graph form; plan 'sequential' "
                              "runs the level schedule (the wavefront on grid2d), plan 'chunk' "
                              "pLSTM's parallel form (grid2d, cells affine in their states)")


def _triton_plan(cell_ir, plan, analysis=None):
    """Plan 'auto' on backend triton: the chunkwise kernels where they apply (gated linear
    attention, the delta rule: matmuls within chunks, the state passed between them); the scan
    when the cell is affine in its state with a diagonal transition and its states are vectors
    (log depth in T; a matrix state would be written out for every step); else the fused
    sequential kernel (one launch, the state on chip; Newton stays opt-in). Returns
    (plan, analysis)."""
    if plan == "sequential":
        return plan, analysis
    if analysis is None:
        from .passes.analysis import analyze_ir
        analysis = analyze_ir(cell_ir)
    if plan == "auto":
        vectors = all(len(d.shape) <= 1 for d in cell_ir.states)
        plan = "scan" if "scan" in analysis.plans and vectors else "sequential"
        if "chunk" in analysis.plans:
            plan = "chunk"
    return plan, analysis


def _load(source_or_path, cell):
    """Read, parse and follow `use` imports; pick the cell. Returns (program, syntax cell)."""
    text, filename = frontend.read_source(source_or_path)
    prog = frontend.load(text, filename)
    return prog, frontend.pick_cell(prog, cell, filename)


def build_ir(source_or_path, cell=None, dims=None):
    """Parse and elaborate one cell. Returns (CellIR, program, syntax cell), or raises NeedStatic
    when a dim with no default sets a loop count and `dims` does not give it."""
    prog, ast = _load(source_or_path, cell)
    return run_pipeline(elaborate(ast, prog.fns, _checked_dims(ast, dims))), prog, ast


def analyze(source_or_path, cell=None, dims=None):
    """The state-transition analysis of a cell (rcc.passes.analysis.Analysis). A dim that sets a
    loop count and has no value takes a small probe value: the structure does not depend on it."""
    from .passes.analysis import analyze_ir

    dims = dict(dims or {})
    while True:
        try:
            cell_ir, _, _ = build_ir(source_or_path, cell, dims)
            return analyze_ir(cell_ir)
        except NeedStatic as need:
            dims.update({name: 2 for name in need.names if name not in dims})


def explain(source_or_path, cell=None, dims=None, device="cpu", lengths=(256, 4096, 65536),
            batch=AUTO_N, graph=None, grid=None, edge_index=None) -> str:
    """The analysis, then the cost model's estimate of each legal plan and the plan 'auto'
    picks, per sequence length (what `rcc explain` prints)."""
    from .runtime.cost import device_kind
    device_kind(device)
    dims = dict(dims or {})
    while True:
        try:
            cell_ir, _, _ = build_ir(source_or_path, cell, dims)
            break
        except NeedStatic as need:
            dims.update({name: 2 for name in need.names if name not in dims})
    if cell_ir.topology != "seq":
        return explain_graph(cell_ir, graph, grid, edge_index)
    if graph is not None:
        raise ValueError(f"cell '{cell_ir.name}' runs over seq: --graph draws the schedule of a "
                         "cell over grid2d or dag")
    from .passes.analysis import analyze_ir
    from .runtime.cost import choose

    analysis = analyze_ir(cell_ir)
    facts = _auto_facts(cell_ir, analysis, dims)
    lines = [str(analysis), f"plan 'auto' on {device}, {batch} sequences per call "
             "(estimated ms by rcc.runtime.cost; dims without a value count 64):"]
    for T in lengths:
        plan, table = choose(facts, facts, device, T, batch)
        cells = ", ".join(f"{p} {1e3 * t:.3g}" for p, t in table.items())
        lines.append(f"  T={T}: {plan}  ({cells})")
    return "\n".join(lines)


def explain_graph(cell_ir, graph=None, grid=None, edge_index=None) -> str:
    """What a cell over grid2d or dag runs: its states' places, how it reads its predecessors,
    the schedule and why; with `graph` (a .png path), a drawing of the schedule on the grid
    `grid` = (X, Y) or the DAG `edge_index` [2, E]."""
    from .runtime.graph import dag_schedule, grid_edges, grid_schedule

    topo = cell_ir.topology
    states = ", ".join(f"{d.name} on {d.over}" for d in cell_ir.states) or "none"
    reads = sorted({(n.attr("agg"), n.attr("k")) for n in cell_ir.nodes if n.op == "pred"})
    forms = ", ".join(f"pred(., {k})" if agg == "index" else f"{agg}_pred(.)" for agg, k in reads)
    lines = [f"cell {cell_ir.name} over {topo}: states {states}; reads its predecessors "
             f"through {forms or 'nothing'}"]
    if topo == "grid2d":
        lines.append("schedule: the wavefront. Node (i, j) needs (i-1, j) and (i, j-1) only, so "
                     "the X + Y - 1 anti-diagonals i + j = const run one after another, every "
                     "node of a diagonal at once (64 x 64: 127 steps for 4096 nodes)")
    else:
        lines.append("schedule: level by level. The levels are networkx's topological "
                     "generations of edge_index: each step runs every node whose predecessors "
                     "are done, at once (gathers and scatter-adds over its edges); a DAG of "
                     "depth L takes L steps")
    from .passes.topology import affine_grid, per_channel_grid
    why = affine_grid(cell_ir)
    chunk = ("plan 'chunk' (pLSTM's parallel form: c x c chunks solved with log-depth products, "
             "a wavefront over chunks) also applies: the states are affine with scalar "
             "transitions" + (" per channel (solved once per channel)" if per_channel_grid(cell_ir)
                              else "") if why is None else f"plan 'chunk' does not apply: {why}")
    triton = ("backend triton runs plan 'chunk' (the chunks and the wavefront over them in "
              "Triton kernels)" if why is None else "backend triton runs plan 'chunk' only")
    lines.append(f"plans: 'sequential' (this schedule; what 'auto' runs: on CPU it is faster "
                 f"than 'chunk', see BENCHMARKS.md); {chunk}. Backend cpp runs the schedule, "
                 f"one C++ kernel call per step; {triton}")
    if graph is not None:
        if topo == "grid2d":
            X, Y = grid or (8, 8)
            schedule = grid_schedule(X, Y)
            src, tgt, _ = grid_edges(X, Y)
            edges = [(int(u), int(w)) for u, w in zip(src, tgt) if w >= 0]
            shape = f"{X} x {Y} grid"
        else:
            if edge_index is None:
                raise ValueError("drawing a dag schedule needs a graph: pass --edge-index FILE")
            n = int(edge_index.max()) + 1 if edge_index.numel() else 1
            schedule = dag_schedule(edge_index, n)
            edges = [tuple(e) for e in edge_index.T.tolist()]
            shape = f"DAG of {n} nodes, {len(edges)} edges"
        from .draw import draw_schedule
        draw_schedule(schedule, edges, graph, f"{cell_ir.name} over {topo}: {shape}, "
                      f"{len(schedule.levels)} steps", grid=(X, Y) if topo == "grid2d" else None)
        lines.append(f"drew the {len(schedule.levels)} steps on the {shape} to {graph}")
    return "\n".join(lines)


def generate(source_or_path, cell=None, backend="auto", plan="auto", dims=None,
             device="cpu") -> str:
    """The generated module's source text (what `rcc compile` writes). A file holds one plan:
    'auto' picks it by the cost model for `device` and T = AUTO_T."""
    from .runtime.cost import device_kind
    backend, plan = _check_choice(backend, plan)
    device_kind(device)
    try:
        cell_ir, _, _ = build_ir(source_or_path, cell, dims)
    except NeedStatic as need:
        raise needs_value(need, "to generate code: give it a default or pass") from None
    cell_ir = _with_dims(cell_ir, dims or {})
    if cell_ir.topology != "seq":
        return _graph_module(cell_ir, backend, plan)
    if backend == "cpp":
        return _fused_printer(backend)(cell_ir)
    if backend == "triton":
        plan, analysis = _triton_plan(cell_ir, plan)
        return _fused_printer(backend)(cell_ir, plan=plan, analysis=analysis)
    from rcc.backends.torch.printer import print_module

    from .passes.analysis import analyze_ir
    from .runtime.cost import choose

    analysis = analyze_ir(cell_ir) if plan != "sequential" else None
    if plan == "auto":
        facts = _auto_facts(cell_ir, analysis, dims)
        plan = choose(facts, facts, device, AUTO_T, AUTO_N)[0]
    return print_module(cell_ir, plan=plan, analysis=analysis)


def needs_value(need: NeedStatic, how: str) -> CompileError:
    """The error for a dim without a value that sets a loop count or split (`how`: what gives it
    one, before `--dims NAME=N`)."""
    name = need.names[0]
    return CompileError(f"dim '{name}' sets a loop count or split here, so it needs a value "
                        f"{how} --dims {name}=N", need.span)


def _with_dims(cell_ir, dims):
    """`dims` (already checked against the cell's by _checked_dims): a dim that sets a loop count
    took its value in elaboration; a free one gets it as its default in the generated module."""
    from dataclasses import replace

    return replace(cell_ir, dims=tuple(
        replace(d, default=dims[d.name]) if d.name in dims and d.static is None else d
        for d in cell_ir.dims))


def _auto_facts(cell_ir, analysis, dims=None):
    """The cost model's facts for each legal plan, the states sized by `dims` (dims with no
    value count 64)."""
    import sympy

    from rcc.backends.torch.plans import plan_facts

    from .ir import dim_symbol

    values = {dim_symbol(d.name): (dims or {}).get(d.name, d.static or d.default or 64)
              for d in cell_ir.dims}

    def numel(shape):
        return int(sympy.prod([sympy.sympify(x).subs(values) for x in shape]))

    facts = plan_facts(cell_ir, analysis)
    state = sum(numel(d.shape) for d in cell_ir.states) or 1
    for f in facts.values():
        f["state"] = state
        if "matrix_state" in f:
            decl = next(d for d in cell_ir.states if d.name == f["matrix_state"])
            f["key"], f["value"] = numel(decl.shape[-2:-1]), numel(decl.shape[-1:])
    return facts


def compile(source_or_path, cell=None, backend="auto", plan="auto", dims=None):  # noqa: A001
    """rcc.compile without its front-end cache: the compiler runs every time (the arguments and
    the class are documented at rcc.frontcache.compile, which is rcc.compile)."""
    return compile_program(source_or_path, cell, backend, plan, dims)[0]


def compile_program(source_or_path, cell=None, backend="auto", plan="auto", dims=None):
    """(the class, the texts of every file the source read: rcc.frontcache records them)."""
    backend, plan = _check_choice(backend, plan)
    prog, ast = _load(source_or_path, cell)
    dims = _checked_dims(ast, dims)
    return _specialize(prog, ast, plan, dims, backend), prog.texts


def _checked_dims(ast, dims) -> dict:
    """`dims` given with a cell: names of its dims, each a positive integer."""
    dims = dict(dims or {})
    names = [d.name for d in ast.dims]
    for name, value in dims.items():
        if name not in names:
            raise CompileError(f"cell '{ast.name}' has no dim '{name}' (dims: "
                               f"{', '.join(names) or 'none'})", ast.span)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CompileError(f"dim '{name}' must be a positive integer, got {value!r}", ast.span)
    return dims


def _specialize(prog, ast, plan, dims, backend="torch"):
    """The class for `dims`' values of the static dims; it re-specializes itself for others."""
    try:
        cell_ir = _with_dims(run_pipeline(elaborate(ast, prog.fns, dims)), dims)
    except NeedStatic:
        return _deferred_class(prog, ast, plan, backend, dims)
    cls = _class_for(cell_ir, plan, backend=backend)
    cls._respecialize = staticmethod(
        lambda all_dims: _specialize(prog, ast, plan, {**dims, **all_dims}, backend))
    return cls


def compile_ir(cell_ir, backend="auto", plan="auto", source_name=""):
    """Compile an already-built CellIR (what @rcc.recurrence traces) to a Module class."""
    backend, plan = _check_choice(backend, plan)
    return _class_for(cell_ir, plan, source_name, backend=backend)


def _class_for(cell_ir, plan, source_name="", analysis=None, backend="torch"):
    """Print the module and load its class, cached by the hash of the generated code: the
    code is what the cache holds, so equal code may be shared whatever produced it.
    `analysis`: the cell's, when the caller has it (the parallel plans need it)."""
    from rcc.backends.torch.printer import print_module

    if cell_ir.topology != "seq":
        code = _graph_module(cell_ir, backend, plan, source_name or cell_ir.filename)
    elif backend == "cpp":
        code = _fused_printer(backend)(cell_ir, source_name or cell_ir.filename)
    elif backend == "triton":
        plan, analysis = _triton_plan(cell_ir, plan, analysis)
        code = _fused_printer(backend)(cell_ir, source_name or cell_ir.filename, plan, analysis)
    elif plan == "auto":
        return _auto_class(cell_ir, source_name)
    else:
        code = print_module(cell_ir, source_name or cell_ir.filename, plan, analysis)
    return class_for_code(code)


def _graph_module(cell_ir, backend, plan, source_name=""):
    """The module of a cell over grid2d or dag (the plan checked by _check_graph)."""
    plan = _check_graph(cell_ir, backend, plan)
    if backend == "cpp":
        from rcc.backends.cpp.graph import print_module as print_graph
        return print_graph(cell_ir, source_name)
    if backend == "triton":
        from rcc.backends.triton.printer import GridChunkPrinter
        return GridChunkPrinter(cell_ir, source_name).module()
    from rcc.backends.torch.graph import print_module as print_graph
    return print_graph(cell_ir, source_name, plan)


def _fused_printer(backend):
    """print_module of a kernel backend."""
    if backend == "cpp":
        from rcc.backends.cpp.printer import print_module
    else:
        from rcc.backends.triton.printer import print_module
    return print_module


def _auto_class(cell_ir, source_name=""):
    """A class running, per call, the plan the cost model picks (rcc.runtime.AutoPlan)."""
    from rcc.backends.torch.plans import plan_facts

    from .passes.analysis import analyze_ir

    analysis = analyze_ir(cell_ir)
    classes = {p: _class_for(cell_ir, p, source_name, analysis) for p in analysis.plans}
    return auto_class(classes, plan_facts(cell_ir, analysis))


def _deferred_class(prog, ast, plan, backend="torch", given=None):
    """A class for a cell whose code depends on a dim with no value yet: it generates the code
    when instantiated, once the dims are known (those `given` to rcc.compile are defaults)."""
    from .runtime.module import CellModule, span

    given = dict(given or {})
    dims = tuple((d.name, given.get(d.name, d.default),
                  span(d.span.filename, d.span.line, d.span.col, d.span.end_col,
                       d.span.source_line)) for d in ast.dims)
    static = {name: None for name, default, _ in dims if default is None}
    cls = type(ast.name, (CellModule,), {"CELL": ast.name, "DIMS": dims, "STATIC_DIMS": static})
    cls._respecialize = staticmethod(
        lambda all_dims: _specialize(prog, ast, plan, {**given, **all_dims}, backend))
    return cls



