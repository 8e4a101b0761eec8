"""Train a compiled rcc cell on the parity task: read a sequence of bits, say whether it has an odd
number of ones (the XOR of all bits).

    python examples/parity.py                       # stdlib/lstm.rnn, 300 Adam steps
    python examples/parity.py --cell-file stdlib/gru.rnn --steps 500 --seed 3

The compiled cell is an ordinary torch.nn.Module: it sits in a model (cell -> linear head on its
output) and trains with any torch optimizer. Parity is a classic test of memory: a single wrong
bit flips the answer, so the cell must carry one bit exactly across the sequence. Cells with a
diagonal, non-negative recurrence (minGRU, say) cannot represent it and stay near 50%; gated cells
with a nonlinear recurrence (LSTM, GRU) learn it.

Training (--loss every, the default) asks the head at every step for the parity of the bits read
so far, which is the same function applied to every prefix: an LSTM learns it in a few hundred
steps. With only the last step's label (--loss last) the gradient says nothing until the whole
task is solved, and an LSTM stays at chance for well over a thousand steps. The accuracy printed
at the end is always that of the last step's answer: the XOR of all the bits.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing rcc

import rcc  # noqa: E402


def resolve_cell_file(path: str) -> str:
    """A relative path is tried from the current directory first, then from the repository root,
    so `--cell-file stdlib/gru.rnn` works from anywhere."""
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), os.path.join(REPO, path)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    tried = ", ".join(candidates)
    raise SystemExit(f"parity.py: error: cell file {path!r} not found (tried {tried}); "
                     "pass --cell-file with a .rnn file, e.g. --cell-file stdlib/mingru.rnn")


def parity_batch(batch: int, length: int, generator: torch.Generator):
    """Random bits [batch, length] and their parity [batch] (0 or 1)."""
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    return bits, bits.sum(1) % 2


class ParityModel(torch.nn.Module):
    """cell -> linear head on the cell's output -> 2 logits per step."""

    def __init__(self, cell_class, hidden: int):
        super().__init__()
        dim_names = [name for name, _, _ in cell_class.DIMS]
        if not {"d_in", "d"} <= set(dim_names):
            raise SystemExit(f"parity.py: error: cell {cell_class.CELL} has dims {dim_names}; this "
                             "example needs a stdlib-style cell with dims (d_in, d)")
        # Each bit is fed as a one-hot vector: 0 -> [1, 0], 1 -> [0, 1].
        self.cell = cell_class(d_in=2, d=hidden)
        with torch.no_grad():
            out_size = self._outputs(torch.zeros(1, 1, 2)).shape[-1]
        self.head = torch.nn.Linear(out_size, 2)

    def _outputs(self, x):
        out, _final = self.cell(x)
        first = out[0] if isinstance(out, tuple) else out  # several outputs: use the first
        return first.reshape(x.shape[0], x.shape[1], -1)  # [B, T, features]

    def forward(self, bits):
        """Logits [B, T, 2]: at step t, whether bits[:, :t + 1] has odd parity."""
        x = torch.nn.functional.one_hot(bits, 2).to(torch.get_default_dtype())
        return self.head(self._outputs(x))


def accuracy(model, lengths, per_length: int, generator) -> float:
    correct = total = 0
    with torch.no_grad():
        for length in lengths:
            bits, labels = parity_batch(per_length, length, generator)
            correct += (model(bits)[:, -1].argmax(1) == labels).sum().item()
            total += per_length
    return correct / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell-file", default=os.path.join(REPO, "stdlib", "lstm.rnn"),
                        help="the .rnn file of the cell (default: stdlib/lstm.rnn)")
    parser.add_argument("--cell", default=None, help="which cell of the file, if it holds several")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64, help="the cell's dim d (default 64)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=16)
    parser.add_argument("--loss", choices=("every", "last"), default="every",
                        help="train on the parity of every prefix (default) or of the whole "
                             "sequence only")
    parser.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
    args = parser.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        parser.error("need 1 <= --min-len <= --max-len")

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    cell_file = resolve_cell_file(args.cell_file)
    Cell = rcc.compile(cell_file, cell=args.cell)
    model = ParityModel(Cell, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    shown = os.path.relpath(cell_file, REPO) if cell_file.startswith(REPO + os.sep) else cell_file
    print(f"cell {Cell.CELL} from {shown}, hidden {args.hidden}, "
          f"{sum(p.numel() for p in model.parameters())} parameters; parity of "
          f"{args.min_len}..{args.max_len} bits, batch {args.batch}, Adam lr {args.lr}, "
          f"loss on {'every prefix' if args.loss == 'every' else 'the last step'}")

    start = time.perf_counter()
    running = None
    for step in range(1, args.steps + 1):
        # one length per batch (the cell has no padding mask), drawn afresh each step
        length = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=data))
        bits, labels = parity_batch(args.batch, length, data)
        logits = model(bits)
        if args.loss == "every":
            prefix_parity = bits.cumsum(1) % 2
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), prefix_parity.reshape(-1))
        else:
            loss = torch.nn.functional.cross_entropy(logits[:, -1], labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  (smoothed {running:.4f})  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)

    lengths = range(args.min_len, args.max_len + 1)
    acc = accuracy(model, lengths, 512, torch.Generator().manual_seed(args.seed + 2))
    print(f"final accuracy {acc:.3f} on {512 * len(lengths)} fresh sequences of "
          f"{args.min_len}..{args.max_len} bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
