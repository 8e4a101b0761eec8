"""The command line: `rcc compile FILE.rnn [-o OUT.py]`, `rcc check FILE.rnn`,
`rcc explain FILE.rnn [--device cpu|cuda] [--graph OUT.png [--grid XxY | --edge-index FILE]]`,
`rcc precompile FILE.rnn --dims ... [--dtype D] [--plan P] [--arch sm_90]` (rcc/precompile.py),
`rcc lsrl FILE.rnn --to linear|hawk|mamba|lstm|gru [--dims ...] [-o OUT.pt]` (rcc/lsrl).

Exit status: 0 ok; 1 the cell cannot be compiled (a compile error, printed as FILE:LINE:COL:
error: ..., or a refusal of the analysis or a backend); 2 the command cannot run as given (usage, a
file that cannot be read or written); 3 an internal error of rcc (a bug: one line, the traceback
with RCC_TRACEBACK=1).
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import CompileError
from .source import packaged_stdlib


def _dims(items):
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise argparse.ArgumentTypeError(f"--dims expects NAME=INT with a positive INT, got "
                                             f"{item!r}")
        out[name.strip()] = int(value)
    return out


def _grid(text):
    if text is None:
        return None
    x, sep, y = text.lower().partition("x")
    if not (sep and x.isdigit() and y.isdigit() and int(x) > 0 and int(y) > 0):
        raise ValueError(f"--grid expects XxY (positive integers, as 8x8), got {text!r}")
    if int(x) * int(y) > 64 * 64:  # a drawing of more nodes is unreadable and takes minutes
        raise ValueError(f"--grid draws at most {64 * 64} nodes (64x64), got {text}")
    return int(x), int(y)


def _edge_index(path):
    """A graph [2, E] from a .pt / .npy file or a text file of 'source target' lines."""
    if path is None:
        return None
    import numpy as np
    import torch

    from .runtime.graph import dag_schedule

    if path.endswith(".pt"):
        edges = torch.as_tensor(torch.load(path, weights_only=True))
    elif path.endswith(".npy"):
        edges = torch.as_tensor(np.load(path))
    else:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
        if pairs.size and pairs.shape[1] != 2:
            raise ValueError(f"{path}: expected lines of 'source target', got {pairs.shape[1]} "
                             "columns")
        edges = torch.as_tensor(pairs.reshape(-1, 2).T.copy())
    try:  # a graph the file names wrongly (a cycle) is an argument's fault, said before any work
        dag_schedule(edges, int(edges.max()) + 1 if edges.numel() else 0)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    return edges


def _parser():
    from . import __version__

    p = argparse.ArgumentParser(prog="rcc", description="A compiler for recurrent cells.")
    p.add_argument("--version", action="version", version=f"rcc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="write the generated Python module of a cell")
    c.add_argument("file")
    c.add_argument("-o", "--output", help="output .py path (default: FILE with .py)")
    c.add_argument("--cell", help="which cell, when the file defines several")
    c.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"])
    c.add_argument("--plan", default="auto",
                   choices=["auto", "sequential", "scan", "chunk", "newton"])
    c.add_argument("--dims", nargs="*", metavar="NAME=INT",
                   help="values for dims that set loop counts (others stay free)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="the device plan 'auto' chooses for (a file holds one plan)")
    e = sub.add_parser("explain", help="print the state-transition analysis, the legal plans "
                                        "and the plan 'auto' would choose")
    e.add_argument("file")
    e.add_argument("--cell")
    e.add_argument("--dims", nargs="*", metavar="NAME=INT", help="values for dims")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--T", type=int, nargs="*", metavar="T", dest="lengths",
                   help="sequence lengths to estimate (default 256 4096 65536)")
    e.add_argument("--batch", type=int, default=8, help="sequences per call, B x heads")
    e.add_argument("--graph", metavar="OUT.png",
                   help="draw the schedule of a cell over grid2d or dag on a graph")
    e.add_argument("--grid", metavar="XxY", help="the grid to draw (grid2d; default 8x8)")
    e.add_argument("--edge-index", metavar="FILE",
                   help="the DAG to draw: a torch .pt or numpy .npy [2, E], or a text file of "
                        "'source target' lines")
    pc = sub.add_parser("precompile", help="compile a cell's Triton kernels ahead of a job (for a GPU "
                                           "not here with --arch) and print their registers and spills")
    pc.add_argument("file")
    pc.add_argument("--cell")
    pc.add_argument("--dims", nargs="*", metavar="NAME=INT", help="every dim of the cell")
    pc.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    pc.add_argument("--plan", default="auto", choices=["auto", "sequential", "chunk", "scan", "newton"],
                    help="the plan whose kernels to compile (auto: the one rcc.compile(backend='triton') "
                         "runs)")
    pc.add_argument("--arch", help="the GPU to compile for, as sm_90 (default: this machine's GPU)")
    pc.add_argument("--batch", type=int, default=16, help="rows per call (batch x heads)")
    ls = sub.add_parser("lsrl", help="compile an LSRL program (a cell written with `use lsrl`) "
                                     "into a stack of layers of an architecture, with set weights",
                        description="Compile an LSRL program into a stack of layers of TARGET "
                                    "(Petrov et al. 2024): its ReLUs, products and LinStates "
                                    "debranched into a path, each stage a layer with its weights "
                                    "set. Prints the stack and its largest difference from the "
                                    "program on random inputs; -o saves it (torch.save).")
    ls.add_argument("file")
    ls.add_argument("--to", required=True, choices=list(_lsrl_targets()), dest="target",
                    help="the architecture of the stack's layers")
    ls.add_argument("--cell")
    ls.add_argument("--dims", nargs="*", metavar="NAME=INT", help="every dim without a default")
    ls.add_argument("-o", "--output", metavar="OUT.pt", help="save the stack (torch.save)")
    k = sub.add_parser("check", help="parse and type-check a .rnn file")
    k.add_argument("file")
    k.add_argument("--cell")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits with status 2 on usage errors
    try:
        dims = _dims(getattr(args, "dims", None))
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if not os.path.isfile(args.file) and packaged_stdlib(args.file) is None:
        what = "not a file" if os.path.exists(args.file) else "no such file"
        print(f"rcc: error: {what}: {args.file}", file=sys.stderr)
        return 2
    if getattr(args, "batch", 1) < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if any(t < 1 for t in getattr(args, "lengths", None) or ()):
        parser.error(f"--T lengths must be at least 1, got {' '.join(map(str, args.lengths))}")
    try:  # what the arguments say, checked before any work
        if args.command == "explain":
            args.grid = _grid(args.grid)
            args.edge_index = _edge_index(args.edge_index)
        if args.command == "precompile":
            _precompile_target(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        return _run(args, dims)
    except CompileError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except OSError as e:  # reading a source or a used file, writing the output
        where = f": {e.filename}" if e.filename else ""
        print(f"rcc: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except (NotImplementedError, ValueError, RuntimeError) as e:  # the analysis' or a backend's refusal
        print(f"rcc: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional package the command needs (triton)
        print(f"rcc: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"rcc: error: out of memory compiling {args.file}: the analysis evaluates the step "
              "element by element at literal sizes; give a large size as a dim, or use --plan sequential",
              file=sys.stderr)
        return 1
    except RecursionError:
        print(f"rcc: error: {args.file} nests too deeply for rcc (expressions, fns or uses)",
              file=sys.stderr)
        return 1
    except Exception as e:  # a bug in rcc: say so in one line
        if os.environ.get("RCC_TRACEBACK"):
            raise
        print(f"rcc: internal error: {type(e).__name__}: {e} (a bug in rcc; RCC_TRACEBACK=1 prints "
              "the traceback)", file=sys.stderr)
        return 3


def _run(args, dims) -> int:
    if args.command == "check":
        return _check(args)
    if args.command == "precompile":
        from .precompile import precompile
        spilling = precompile(args.file, cell=args.cell, dims=dims, dtype=args.dtype, plan=args.plan,
                              arch=args.arch, batch=args.batch)
        if spilling:
            print(f"rcc: warning: {spilling} kernels spill registers", file=sys.stderr)
        return 0
    if args.command == "lsrl":
        from .lsrl.cli import run
        return run(args, dims)
    if args.command == "explain":
        from .api import explain
        print(explain(args.file, cell=args.cell, dims=dims, device=args.device,
                      lengths=args.lengths or (256, 4096, 65536), batch=args.batch,
                      graph=args.graph, grid=args.grid, edge_index=args.edge_index))
        return 0
    from .api import generate
    code = generate(args.file, cell=args.cell, backend=args.backend, plan=args.plan, dims=dims,
                    device=args.device)
    out = args.output or _default_output(args.file)
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(code)
    except OSError as e:
        raise OSError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}")
    return 0


def _lsrl_targets():
    from .lsrl.targets import TARGETS
    return TARGETS


def _precompile_target(args):
    from .precompile import parse_arch
    if args.arch is not None:
        parse_arch(args.arch)
        return
    import torch
    if not torch.cuda.is_available():
        raise ValueError("rcc precompile without --arch compiles for this machine's GPU, and there is "
                         "none: name the target, as --arch sm_90")


def _default_output(path) -> str:
    """FILE.rnn -> FILE.py, unless FILE names an importable module (torch.rnn would write a
    torch.py that shadows torch in that folder): then FILE_cell.py, said on stderr."""
    import importlib.util

    name = os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    # a module found only as the file rcc wrote here before is not shadowed: rewrite it
    taken = spec is not None and os.path.abspath(spec.origin or "") != os.path.abspath(name + ".py")
    if not taken:
        return name + ".py"
    print(f"rcc: note: {name}.py would shadow the module '{name}' for code in this folder; "
          f"writing {name}_cell.py (choose another name with -o)", file=sys.stderr)
    return name + "_cell.py"


def _check(args) -> int:
    from . import frontend
    from .elaborate import NeedStatic, elaborate
    from .passes import run_pipeline

    text, filename = frontend.read_source(args.file)
    prog = frontend.load(text, filename)
    cells = [frontend.pick_cell(prog, args.cell, filename)] if args.cell else \
        [c for c in prog.cells.values() if c.span.filename == filename]
    if not cells:
        # a library of fns: they are checked where a cell uses them
        print(f"{filename}: ok (no cells; {len(prog.fns)} fns)")
    from .passes.analysis import analyze_ir

    for cell in cells:
        plans = ""
        try:
            cell_ir = run_pipeline(elaborate(cell, prog.fns))
            if cell_ir.topology == "seq":  # what rcc compile runs: the analysis too
                plans = f" (legal plans: {', '.join(analyze_ir(cell_ir).plans)})"
            else:  # what printing a graph module checks: which values are per edge
                from .passes.topology import spaces
                spaces(cell_ir)
        except NeedStatic:
            pass  # depends on a dim value given at instantiation; the rest was checked
        print(f"{filename}: cell {cell.name}: ok{plans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
