"""A model holding rcc cells trains under torch.distributed, DDP and FSDP2 (fully_shard), with
the losses and final params of one process training on the whole batch: 2 processes, gloo, CPU.

Each rank trains on its half of the batch; the loss is a mean over the batch, so the gradients
DDP and FSDP2 average over the ranks are the whole batch's."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rcc
from conftest import stdlib

STEPS, B, T, D = 3, 4, 9, 5


class Model(torch.nn.Module):
    """Two rcc layers (backend torch, plan auto; backend cpp) between linear layers."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(3, D)
        self.lstm = rcc.compile(stdlib("lstm.rnn"))(d_in=D, d=D)
        self.gru = rcc.compile(stdlib("gru.rnn"), backend="cpp")(d_in=D, d=D)
        self.out = torch.nn.Linear(D, 1)

    def forward(self, x):
        y, _ = self.lstm(torch.tanh(self.inp(x)))
        y, _ = self.gru(y)
        return self.out(y).square().mean()


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, T, 3, generator=g, dtype=torch.float64) for _ in range(STEPS)]


def train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in batches:
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def fresh_model():
    torch.manual_seed(0)
    return Model().double()


def _rank(rank, world, init_file, how, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = fresh_model()
        if how == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for layer in (model.lstm, model.gru):
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
            assert all(hasattr(p, "full_tensor") for p in model.parameters())  # sharded
        half = B // world
        losses = torch.stack(train(wrapped, [x[rank * half:(rank + 1) * half] for x in data()]))
        dist.all_reduce(losses)  # the mean over ranks: the whole batch's loss
        params = {}
        for name, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: DTensor shards
            params[name] = full.detach().clone()
        if rank == 0:
            torch.save({"losses": losses / world, "params": params}, f"{out_dir}/result.pt")
        dist.barrier()  # both ranks are done: the result is written
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without gloo's teardown: under load, destroy_process_group (or the interpreter's exit)
    # aborted a rank now and then with "terminate called without an active exception" (a gloo
    # thread still joinable), after everything under test had finished: seen three times, twice
    # in clean-clone CI runs. os._exit runs no C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_training_under_torch_distributed_equals_one_process(how, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("this torch has no gloo backend (CPU torch.distributed)")
    model = fresh_model()
    want_losses = torch.stack(train(model, data()))
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), how, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(tmp_path / "result.pt")
    torch.testing.assert_close(got["losses"], want_losses, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-10, atol=1e-12,
                                   msg=f"parameter {name}")


if __name__ == "__main__":  # spawned children import this file as __mp_main__
    sys.exit(0)
