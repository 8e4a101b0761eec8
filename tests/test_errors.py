"""Compile errors (LANGUAGE.md section 9): each bad cell raises rcc.CompileError at the right
line and column, with a message naming what is wrong and a caret under the offending token."""
import os
import textwrap

import pytest
import torch

import rcc


def cell_text(body, header="cell C(d, e) {", extra=""):
    """A cell whose body lines start at line 2 (plus len(extra lines) if `extra` precedes it)."""
    return extra + header + "\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n}\n"


def expect_error(source, line, col, *words, width=None, filename="<string>", **compile_kw):
    """Compile `source` (text or a path); check the error's position, message words and
    rendering; return it."""
    with pytest.raises(rcc.CompileError) as info:
        rcc.compile(source, **compile_kw)
    text = open(source).read() if os.path.isfile(source) else source
    return check_error(info.value, text, line, col, *words, width=width, filename=filename)


def check_error(err, source, line, col, *words, width=None, filename="<string>"):
    assert (err.filename, err.line, err.col) == (filename, line, col), err.render()
    for w in words:
        assert w in err.message, err.render()
    head, text, caret = err.render().split("\n")[:3]
    assert head == f"{filename}:{line}:{col}: error: {err.message}"
    line_text = source.split("\n")[line - 1]
    if len(line_text) > 100:  # a long line is shown as a window around the column
        assert "..." in text and len(text) < 120
        assert text[caret.index("^")] == line_text[col - 1], err.render()
        return err
    assert text == "    " + line_text
    assert caret.startswith("    " + " " * (col - 1) + "^"), err.render()
    if width is not None:
        assert caret == "    " + " " * (col - 1) + "^" * width, err.render()
    assert "Traceback" not in err.render()
    return err


# ---- unknown names ---------------------------------------------------------------------------
def test_unknown_value_name():
    src = cell_text("""
        input x[d]
        state h[d]
        h' = h + y
        output o = h'
    """)
    expect_error(src, 4, 14, "unknown name 'y'", width=1)


def test_unknown_function():
    src = cell_text("""
        input x[d]
        output o = sigmoidd(x)
    """)
    expect_error(src, 3, 16, "unknown function 'sigmoidd'", width=8)


def test_unknown_dim_in_shape():
    src = cell_text("""
        input x[d]
        param W[d, k]
        output o = x
    """)
    err = expect_error(src, 3, 16, "unknown dim 'k'", "axis 1 of 'W'", width=1)
    assert "dims of cell 'C': d, e" in err.message


def test_unknown_dim_inside_a_shape_expression():
    src = cell_text("""
        input x[2 * d + k]
        output o = x
    """)
    expect_error(src, 2, 21, "unknown dim 'k'", width=1)


# ---- shape mismatches name both shapes -------------------------------------------------------
def test_elementwise_broadcast_mismatch():
    src = cell_text("""
        input x[d]
        param b[e]
        output o = x + b
    """)
    expect_error(src, 4, 18, "shape mismatch", "[d]", "[e]", "broadcast", width=1)


def test_matmul_inner_dims_mismatch():
    src = cell_text("""
        input x[d]
        param W[e, e]
        output o = W @ x
    """)
    expect_error(src, 4, 18, "shape mismatch in @", "[e, e] @ [d]", "inner sizes e and d", width=1)


def test_state_update_of_the_wrong_shape():
    src = cell_text("""
        input x[e]
        state h[d]
        h' = x
        output o = h'
    """)
    expect_error(src, 4, 5, "state 'h' is [d]", "its update is [e]", width=2)


def test_concat_mismatch():
    src = cell_text("""
        input x[d, e]
        param W[e, d]
        output o = concat(x, W, axis=1)
    """)
    expect_error(src, 4, 16, "shape mismatch in concat()", "[d, e]", "[e, d]", width=6)


# ---- states ----------------------------------------------------------------------------------
def test_state_updated_twice_with_note_at_first_update():
    src = cell_text("""
        input x[d]
        state h[d]
        h' = x
        h' = h + x
        output o = h'
    """)
    err = expect_error(src, 5, 5, "state 'h' is updated twice", "first at line 4", width=2)
    (note, span), = err.notes
    assert "first updated here" in note and (span.line, span.col) == (4, 5)
    assert "<string>:4:5: note: first updated here" in err.render()


def test_primed_state_used_before_its_update():
    src = cell_text("""
        input x[d]
        state h[d]
        y = h' + x
        h' = x
        output o = y
    """)
    expect_error(src, 4, 9, "h' is used before its update", width=2)


@pytest.mark.parametrize("decl, use, line, col, kind", [
    ("input x[d]\nstate h[d]", "h' = x' + h", 4, 10, "input 'x'"),
    ("input x[d]\nparam W[d]\nstate h[d]", "W' = x", 5, 5, "param 'W'"),
    ("input x[d]\nstate h[d]\na = x", "h' = a'", 5, 10, "local value 'a'"),
    ("input x[d]\nstate h[d]", "h' = h * d'", 4, 14, "dim 'd'"),
])
def test_prime_on_a_non_state(decl, use, line, col, kind):
    src = cell_text(decl + "\n" + use + "\noutput o = x")
    expect_error(src, line, col, kind, "is not a state", "only states can be primed", width=2)


def test_update_of_an_undeclared_state():
    src = cell_text("""
        input x[d]
        g' = x
        output o = x
    """)
    expect_error(src, 3, 5, "unknown state 'g'", width=2)


# ---- dims: unbound, non-positive -------------------------------------------------------------
MINI = "cell M(d_in, d = 3) {\n    input x[d_in]\n    param W[d, d_in]\n    output y = W @ x\n}\n"


def test_instantiating_without_a_required_dim_points_at_the_header():
    Cell = rcc.compile(MINI)
    with pytest.raises(rcc.CompileError) as info:
        Cell(d=2)
    check_error(info.value, MINI, 1, 8, "dim 'd_in' is not bound", "d_in=", width=4)


def test_default_dim_zero():
    src = "cell M(d_in, d = 0) {\n    input x[d_in]\n    output y = x\n}\n"
    expect_error(src, 1, 14, "dim 'd' must be a positive integer, got 0", width=1)


@pytest.mark.parametrize("value", [0, -3])
def test_instantiating_with_a_non_positive_dim(value):
    Cell = rcc.compile(MINI)
    with pytest.raises(rcc.CompileError) as info:
        Cell(d_in=value)
    check_error(info.value, MINI, 1, 8, "dim 'd_in' must be a positive integer",
                f"got {value}", width=4)


def test_shape_that_becomes_non_positive_at_instantiation():
    src = cell_text("""
        input x[d]
        param W[d - 4]
        output o = x
    """, header="cell C(d) {")
    Cell = rcc.compile(src)
    assert Cell(d=5).W.shape == (1,)
    with pytest.raises(rcc.CompileError) as info:
        Cell(d=3)
    check_error(info.value, src, 3, 13, "axis 0 of 'W' is -1", "positive", width=5)


def test_literal_shape_that_is_not_positive():
    src = cell_text("""
        input x[d - d]
        output o = x
    """)
    expect_error(src, 2, 13, "axis 0 of 'x' is 0", "positive integer", width=5)


def test_index_out_of_range_once_dims_are_bound():
    src = cell_text("""
        input x[d]
        output o = x[3]
    """, header="cell C(d) {")
    Cell = rcc.compile(src)
    y, _ = Cell(d=4)(torch.arange(8.0).reshape(1, 2, 4))
    assert y.tolist() == [[3.0, 7.0]]
    with pytest.raises(rcc.CompileError) as info:
        Cell(d=3)
    check_error(info.value, src, 3, 18, "index 3 is out of range for an axis of size d", "when d=3")


def test_slice_past_the_end_once_dims_are_bound():
    src = cell_text("""
        input x[d]
        output o = sum(x[1:5])
    """, header="cell C(d) {")
    Cell = rcc.compile(src)
    with pytest.raises(rcc.CompileError) as info:
        Cell(d=3)
    check_error(info.value, src, 3, 22, "slice 1:5 is out of range for an axis of size d",
                "when d=3")


# ---- arity -----------------------------------------------------------------------------------
def test_wrong_arity_of_a_builtin():
    src = cell_text("""
        input x[d]
        output o = sigmoid(x, x)
    """)
    expect_error(src, 3, 16, "sigmoid() takes 1 argument, got 2", width=7)


def test_wrong_arity_of_a_binary_builtin():
    src = cell_text("""
        input x[d]
        output o = max(x)
    """)
    expect_error(src, 3, 16, "max() takes 2 arguments, got 1", width=3)


def test_wrong_arity_of_a_user_fn_with_note_at_definition():
    src = "fn mix(a, b) = a + b\n" + cell_text("""
        input x[d]
        output o = mix(x)
    """)
    err = expect_error(src, 4, 16, "fn 'mix' takes 2 arguments, got 1", width=3)
    (note, span), = err.notes
    assert "defined here" in note and (span.line, span.col) == (1, 4)


# ---- errors inside inlined fns ---------------------------------------------------------------
def test_error_inside_an_fn_points_at_the_use_with_a_note_in_the_definition():
    src = "fn proj(W, v) = W @ v\n" + cell_text("""
        input x[d]
        param U[e, e]
        output o = proj(U, x)
    """)
    err = expect_error(src, 5, 16, "shape mismatch in @", "[e, e] @ [d]", "(in fn 'proj')",
                       width=4)
    (note, span), = err.notes
    assert note == "in fn 'proj', here" and (span.line, span.col) == (1, 19)
    assert err.render().split("\n")[3:] == [
        "<string>:1:19: note: in fn 'proj', here", "    fn proj(W, v) = W @ v",
        "                      ^"]


def test_error_two_fns_deep_lists_each_body_outermost_first():
    src = "fn inner(a) = a + q\nfn wrap(a) = inner(a) * 2\n" + cell_text("""
        input x[d]
        output o = wrap(x)
    """)
    err = expect_error(src, 5, 16, "unknown name 'q'", "(in fn 'wrap')")
    assert [(n, s.line, s.col) for n, s in err.notes] == [
        ("in fn 'wrap', here", 2, 14), ("in fn 'inner', here", 1, 19)]


def test_fn_body_cannot_see_the_callers_locals():
    src = "fn f(a) = a + x\n" + cell_text("""
        input x[d]
        output o = f(x)
    """)
    expect_error(src, 4, 16, "unknown name 'x'", "sees only its parameters")


def test_recursion_in_fns():
    src = "fn f(a) = g(a)\nfn g(a) = f(a) + 1\n" + cell_text("""
        input x[d]
        output o = f(x)
    """)
    err = expect_error(src, 5, 16, "fn 'f' calls itself (f -> g -> f)", "recursion", width=1)
    notes = [(n, s.line, s.col) for n, s in err.notes]
    assert notes[:2] == [("in fn 'f', here", 1, 11), ("in fn 'g', here", 2, 11)]
    assert notes[-1] == ("'f' is defined here", 1, 4)


def test_direct_recursion():
    src = "fn f(a) = f(a)\n" + cell_text("""
        input x[d]
        output o = f(x)
    """)
    expect_error(src, 4, 16, "fn 'f' calls itself (f -> f)")


# ---- run time: the input shape ---------------------------------------------------------------
def test_input_of_the_wrong_shape_is_a_value_error_naming_it():
    m = rcc.compile(MINI)(d_in=4)
    with pytest.raises(ValueError, match=r"input 'x' has shape \[2, 5, 3\].*\[B, T, \*heads, 4\]"):
        m(torch.randn(2, 5, 3))


# ---- syntax ----------------------------------------------------------------------------------
def test_unexpected_token():
    src = cell_text("""
        input x[d]
        output o = x +* x
    """)
    err = expect_error(src, 3, 19, "unexpected '*'", "expected", width=1)
    assert "a name" in err.message and "'('" in err.message


def test_unexpected_character():
    src = cell_text("""
        input x[d]
        output o = x $ x
    """)
    expect_error(src, 3, 18, "unexpected character '$'", width=1)


def test_unclosed_brace_at_end_of_file():
    src = "cell C(d) {\n    input x[d]\n    output o = x\n"
    err = expect_error(src, 3, 17, "end of file", "'{' is never closed")
    (note, span), = err.notes
    assert (span.line, span.col) == (1, 11) and "opened here" in note


def test_statement_cut_short_by_end_of_line():
    src = cell_text("""
        input x[d]
        output o = x *
    """)
    expect_error(src, 3, 19, "unexpected end of line")


def test_stray_prime():
    src = cell_text("""
        input x[d]
        output o = x + '
    """)
    expect_error(src, 3, 20, "unexpected character", "'")


def test_dim_default_must_be_an_integer():
    expect_error("cell C(d = 0.5) {\n    input x[d]\n    output o = x\n}\n", 1, 12,
                 "default of dim 'd' must be an integer", width=3)


def test_positional_argument_after_keyword():
    src = cell_text("""
        input x[d]
        output o = sum(axis=0, x)
    """)
    expect_error(src, 3, 28, "positional argument after a keyword argument", width=1)


def test_axis_given_twice():
    src = cell_text("""
        input x[d]
        output o = sum(x, 0, axis=0)
    """)
    expect_error(src, 3, 31, "gets its axis twice")


# ---- files and cells -------------------------------------------------------------------------
def test_use_of_a_missing_file(tmp_path):
    path = tmp_path / "main.rnn"
    src = 'use "missing.rnn"\n' + cell_text("input x[d]\noutput o = x")
    path.write_text(src)
    err = expect_error(str(path), 1, 1, "cannot read 'missing.rnn'", filename=str(path))
    assert str(tmp_path / "missing.rnn") in err.message


def test_use_of_a_missing_stdlib_module():
    src = "use nosuchmodule\n" + cell_text("input x[d]\noutput o = x")
    expect_error(src, 1, 1, "no stdlib module 'nosuchmodule'")


def test_use_cycle(tmp_path):
    (tmp_path / "a.rnn").write_text('use "b.rnn"\n' + cell_text("input x[d]\noutput o = x"))
    (tmp_path / "b.rnn").write_text('use "./a.rnn"\nfn f(a) = a\n')
    with pytest.raises(rcc.CompileError) as info:
        rcc.compile(str(tmp_path / "a.rnn"))
    assert "cycle" in info.value.message and info.value.filename.endswith("b.rnn")


def test_several_cells_without_cell_argument(tmp_path):
    src = cell_text("input x[d]\noutput o = x", header="cell A(d) {") + \
        cell_text("input x[d]\noutput o = x", header="cell B(d) {")
    path = tmp_path / "two.rnn"
    path.write_text(src)
    err = expect_error(str(path), 5, 6, "2 cells are defined (A, B)", "cell=", width=1,
                       filename=str(path))
    assert "--cell" in err.message
    assert rcc.compile(str(path), cell="B").CELL == "B"


def test_unknown_cell_name():
    src = cell_text("input x[d]\noutput o = x")
    expect_error(src, 1, 6, "no cell named 'Z' (cells: C)", cell="Z")


def test_missing_rnn_file_is_a_compile_error():
    with pytest.raises(rcc.CompileError, match="cannot read nothere.rnn: No such file"):
        rcc.compile("nothere.rnn")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bin.rnn"
    path.write_bytes(b"cell C(d) {\xff}\n")
    with pytest.raises(rcc.CompileError, match="not UTF-8"):
        rcc.compile(str(path))


# ---- topology --------------------------------------------------------------------------------
def test_unknown_topology():
    src = cell_text("input x[d]\noutput o = x", header="cell C(d) over tree {")
    expect_error(src, 1, 16, "unknown topology 'tree' (expected seq, grid2d or dag)", width=4)


@pytest.mark.parametrize("topology", ["grid2d", "dag"])
def test_bare_state_over_a_graph_is_ambiguous(topology):
    src = cell_text("input x[d]\nstate h[d]\nh' = h + x\noutput h'",
                    header=f"cell C(d) over {topology} {{")
    expect_error(src, 4, 10, f"over {topology} a node can have several predecessors, so state "
                 "'h' alone is ambiguous")


# ---- names: Python keywords, builtins, module attributes -------------------------------------
def test_python_keywords_and_builtins_as_names_compile_to_valid_code():
    src = """cell lambda(class, print = 2) {
    input def[class], len
    param list[class], exec[print]
    state import[class], return[class]
    yield = def * list + import
    import' = yield * len + sum(exec)
    return' = return + import'
    output torch = import'
    output None_ = return'
}
"""
    Cell = rcc.compile(src)
    code = rcc.generate(src)
    compile(code, "<generated>", "exec")  # valid Python
    m = Cell(**{"class": 3}).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    n = torch.randn(2, 4, dtype=torch.float64)
    (a, b), final = m(**{"def": x, "len": n})
    W = getattr(m, "list")
    s = getattr(m, "exec").sum()
    imp = torch.zeros(2, 3, dtype=torch.float64)
    ret = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(4):
        imp = (x[:, t] * W + imp) * n[:, t, None] + s
        ret = ret + imp
        torch.testing.assert_close(a[:, t], imp)
        torch.testing.assert_close(b[:, t], ret)
    torch.testing.assert_close(final["import"], imp)


def test_names_that_look_like_generated_code_do_not_inject():
    src = """cell C(torch, F = 2) {
    input math[torch], _rt
    param self_[torch, F]
    state _N[torch]
    _N' = math * _rt + _N
    output kwargs = self_.T @ _N'
}
"""
    Cell = rcc.compile(src)
    m = Cell(torch=3).double()
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    r = torch.randn(1, 2, dtype=torch.float64)
    y, final = m(x, r)
    h = x[:, 0] * r[:, 0, None]
    h = x[:, 1] * r[:, 1, None] + h
    torch.testing.assert_close(final["_N"], h)
    torch.testing.assert_close(y[:, 1], h @ m.self_)


@pytest.mark.parametrize("name", ["forward", "training", "parameters", "dims", "reset_parameters"])
def test_param_named_like_a_module_attribute(name):
    src = cell_text(f"input x[d]\nparam {name}[d]\noutput o = x * {name}")
    expect_error(src, 3, 11, f"param '{name}' clashes", width=len(name))


def test_param_named_like_a_python_keyword():
    src = cell_text("input x[d]\nparam class[d]\noutput o = x * class")
    expect_error(src, 3, 11, "a param cannot be named 'class'", width=5)


@pytest.mark.parametrize("decl, col, words", [
    ("input initial_state[d]", 11, "an input cannot be named 'initial_state'"),
    ("input self[d]", 11, "an input cannot be named 'self'"),
    ("input None[d]", 11, "'None' is reserved"),
    ("input cu_seqlens[d]", 11, "an input cannot be named 'cu_seqlens'"),
    ("input lengths[d]", 11, "an input cannot be named 'lengths'"),
    ("input output_final_state[d]", 11, "an input cannot be named 'output_final_state'"),
])
def test_reserved_input_names(decl, col, words):
    src = cell_text(decl + "\noutput o = d")
    expect_error(src, 2, col, words)


def test_reserved_dim_name():
    expect_error("cell C(self) {\n    input x[self]\n    output o = x\n}\n", 1, 8,
                 "a dim cannot be named 'self'", width=4)


# ---- constants and sizes ---------------------------------------------------------------------
@pytest.mark.parametrize("expr, col, words", [
    ("x * sqrt(-1)", 20, "sqrt(-1) is not a finite real number"),
    ("x * log(0)", 20, "log(0) is not a finite real number"),
    ("x * exp(1000)", 20, "exp(1000) is not a finite real number"),
    ("x * 10 ** 10 ** 10", 23, "is not a finite real number"),
    ("x * 1e999", 20, "number 1e999 is too large"),
    ("x * (1 / 0)", 23, "division by zero"),
    ("x * d ** 100000", 22, "exponent 100000 is too large"),
])
def test_constants_that_are_not_finite(expr, col, words):
    src = cell_text(f"input x[d]\noutput o = {expr}")
    expect_error(src, 3, col, words)


def test_huge_integer_literal():
    src = cell_text("input x[d]\noutput o = x * " + "9" * 500)
    err = expect_error(src, 3, 20, "integer literal with 500 digits is too large")
    assert len(err.render().split("\n")[1]) < 120  # a long line is shown as an excerpt


def test_axis_too_large_for_int64():
    src = cell_text("input x[99999999999999999999]\noutput o = x")
    expect_error(src, 2, 13, "too large for a tensor axis")


def test_loop_too_long_to_unroll():
    src = cell_text("input x[d]\nfor j in 0..1000000000 {\n    x = x + 1\n}\noutput o = x")
    expect_error(src, 3, 17, "unroll to more than")


def test_split_into_too_many_parts():
    src = cell_text("input x[d]\na, b = split(x, 1000000000)\noutput o = a")
    expect_error(src, 3, 21, "split() into 1000000000 parts")


def test_expression_nested_too_deeply():
    src = cell_text("input x[d]\noutput o = x" + " + x" * 400)
    expect_error(src, 3, 5, "nested too deeply")


@pytest.mark.parametrize("init, words", [
    ("uniform(1, 0)", "needs a <= b"),
    ("normal(0, -1)", "needs std >= 0"),
    ("1e300", "does not fit a float32 parameter"),
    ("eye", "needs a rank-2 shape"),
    ("nonsense", "unknown initializer 'nonsense'"),
])
def test_bad_param_initializers(init, words):
    src = cell_text(f"input x[d]\nparam W[d] = {init}\noutput o = x * W")
    expect_error(src, 3, 18, words)


# ---- regressions: built-ins on constants, stack() ------------------------------------------
def test_builtins_on_constants_fold_and_constant_results_are_tensors():
    src = cell_text("""
        input x[d]
        state c, s[2]
        c' = 0.5
        s' = stack(silu(1.0), softplus(0.0) + (1 < 2))
        output k = 2.0
        output y = x * logaddexp(0, 0) + (d > 2)
    """, header="cell C(d) {")
    m = rcc.compile(src)(d=3).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    (k, y), final = m(x)
    torch.testing.assert_close(k, torch.full((2, 4), 2.0, dtype=torch.float64))
    torch.testing.assert_close(y, x * torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1)
    torch.testing.assert_close(final["c"], torch.full((2,), 0.5, dtype=torch.float64))
    silu1 = torch.nn.functional.silu(torch.tensor(1.0, dtype=torch.float64))
    want = torch.stack([silu1, torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1])
    torch.testing.assert_close(final["s"], want.expand(2, 2))
