"""Backend triton's per-row loop split over programs along the axis its step never mixes
(backends/triton/value_split.py): the value axis of matrix states (GLA, the delta rules, mLSTM,
KDA, RWKV-6/7), Mamba's channels. Each program computes its columns; values without the axis are
computed by every program, and their adjoints come back as parts the runtime sums. Checked with
blocks of 2 columns (3 programs for 5 columns) against the torch reference, T=1 and T=4."""
import pytest
import torch

import rcc
import rcc.runtime.triton.loop as loop
from conftest import STDLIB_DIMS, stdlib
from test_triton_units import _compare

SPLIT = {"mlstm.rnn": "V", "gla.rnn": "V", "deltanet.rnn": "V", "gated_deltanet.rnn": "V",
         "deltaproduct.rnn": "V", "kda.rnn": "V", "rwkv7.rnn": "V", "rwkv6.rnn": "V",
         "comba.rnn": "V", "linear_attention.rnn": "V", "retnet.rnn": "V", "mamba.rnn": "d",
         "mamba2.rnn": "P"}


@pytest.fixture
def two_columns(monkeypatch):
    monkeypatch.setattr(loop, "value_block", lambda extent: 2)


@pytest.mark.parametrize("name", sorted(SPLIT))
@pytest.mark.parametrize("T", [1, 4])
def test_columns_split_over_programs_equal_torch(two_columns, name, T):
    dims = dict(STDLIB_DIMS[name], **{SPLIT[name]: 5})
    source = rcc.generate(stdlib(name), backend="triton", plan="sequential", dims=dims)
    assert "_split = {'extent'" in source
    _compare(stdlib(name), dims, 3, T, torch.float64, {"rtol": 1e-10, "atol": 1e-11})


@pytest.mark.parametrize("step", [
    "S' = S @ S + outer(k, k)",  # contracts both axes
    "S' = S + outer(k, concat(S[0, 1:], S[0, :1]))",  # moves columns
    "S' = S * sum(S, axis=1)[:, None] + outer(k, k)",  # reduces over columns
])
def test_a_step_that_mixes_columns_is_not_split(step):
    source = f"cell M(d) {{\n input k[d]\n state S[d, d]\n {step}\n output y = S'\n}}\n"
    assert "_split = None" in rcc.generate(source, backend="triton", plan="sequential")
