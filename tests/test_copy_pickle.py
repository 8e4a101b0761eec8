"""Generated modules behave like torch modules under copy and pickle: deepcopy (EMA/SWA's
AveragedModel), pickle and torch.save/torch.load of a whole model, in this process and in a new
one, on every backend and plan auto (issue 18, item 2)."""
import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch

import rcc
from conftest import cell_inputs, stdlib

CASES = [("lstm.rnn", {"d_in": 3, "d": 4}, "torch", "auto"),
         ("gla.rnn", {"K": 3, "V": 2}, "torch", "auto"),
         ("mingru.rnn", {"d_in": 3, "d": 4}, "torch", "scan"),
         ("kda.rnn", {"K": 3, "V": 2}, "torch", "chunk"),
         ("lstm.rnn", {"d_in": 3, "d": 4}, "cpp", "sequential"),
         ("mingru.rnn", {"d_in": 3, "d": 4}, "triton", "sequential"),
         ("mdrnn.rnn", {"d_in": 2, "d": 3}, "torch", "sequential")]


def _torch_save_load(m):
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("file,dims,backend,plan", CASES)
def test_round_trip_gives_an_independent_equal_module(file, dims, backend, plan, how):
    m = rcc.compile(stdlib(file), backend=backend, plan=plan)(**dims).double()
    if file == "mdrnn.rnn":
        xs, init = [torch.randn(2, 3, 4, 2, dtype=torch.float64)], None
    else:
        xs, init = cell_inputs(m, 2, 5, ())
    copy_of = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
               "torch.save": _torch_save_load}[how]
    m2 = copy_of(m)
    assert type(m2).__name__ == type(m).__name__ and m2.dims == m.dims
    torch.testing.assert_close(m2(*xs, initial_state=init)[0], m(*xs, initial_state=init)[0])
    for (name, p), p2 in zip(m.named_parameters(), m2.parameters()):
        assert p2.data_ptr() != p.data_ptr(), name  # a copy, not a shared tensor
    if list(m.parameters()):  # GLA and KDA have none
        with torch.no_grad():
            next(m2.parameters()).add_(1.0)
        assert not torch.equal(next(m2.parameters()), next(m.parameters()))


def test_averaged_model_of_an_rcc_module():
    m = rcc.compile(stdlib("gla.rnn"))(K=3, V=2)
    swa = torch.optim.swa_utils.AveragedModel(m)
    swa.update_parameters(m)
    xs, _ = cell_inputs(m, 2, 4, (), dtype=torch.float32)
    torch.testing.assert_close(swa(*xs)[0], m(*xs)[0])


def test_a_saved_model_loads_in_a_new_process(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model.cell = rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    x = torch.randn(2, 5, 3)
    want = model.cell(model[0](x))[0]
    torch.save(x, tmp_path / "x.pt")
    script = ("import torch\n"
              f"m = torch.load({str(path)!r}, weights_only=False)\n"
              f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
              f"torch.save(m.cell(m[0](x))[0], {str(tmp_path / 'y.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want)


def test_state_dict_round_trip():
    m = rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)
    m2 = rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(m2(x)[0], m(x)[0])
