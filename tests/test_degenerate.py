"""Degenerate expressions (a division by zero, the log of zero, a complex root) never crash the
analysis: the cell compiles, its parallel plans are only those that stay exact, and `rcc check`
runs the analysis as `rcc compile` does (issue 21, F1)."""
import pytest
import torch

import rcc
from test_cli import rcc_cli

CELLS = {
    "division by a zero input": "h * 0.5 + x / (x - x)",
    "zeros over zeros": "h * (zeros(d) / zeros(d)) + x",
    "log of zero": "h * log(x - x) + x",
    "division by a zero state": "h / (h - h) + x",
    "complex root": "sqrt(-1 - x * x) * h + x",
}


def _cell(update):
    return f"cell C(d) {{\n    input x[d]\n    state h[d]\n    h' = {update}\n    output h'\n}}\n"


@pytest.mark.parametrize("name", sorted(CELLS))
def test_degenerate_cells_compile_and_every_legal_plan_agrees(name):
    src = _cell(CELLS[name])
    analysis = rcc.analyze(src)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    want = rcc.compile(src, plan="sequential")(d=3).double()(x)[0]
    for plan in analysis.plans:
        got = rcc.compile(src, plan=plan)(d=3).double()(x)[0]
        torch.testing.assert_close(got, want, equal_nan=True)


def test_check_runs_the_analysis(tmp_path):
    path = tmp_path / "c.rnn"
    path.write_text(_cell(CELLS["division by a zero state"]))
    r = rcc_cli("check", str(path))
    assert r.returncode == 0, r.stderr
    assert "legal plans: sequential" in r.stdout and "Traceback" not in r.stderr
