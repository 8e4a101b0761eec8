"""Classify small synthetic images with a 2D pLSTM (stdlib/plstm.rnn, cell PLSTM2DP), a cell that
runs over the pixel grid instead of over time.

    python examples/plstm_images.py                       # 8 x 8 images, 4 classes, 100 Adam steps
    python examples/plstm_images.py --size 12 --steps 300 --plan chunk

Each image is noise with one short line on it, at a random place: horizontal, vertical, diagonal
or anti-diagonal (4 classes, chance 25%). Every pixel looks alike on its own (bright or not), and
the model sees the pixels one by one through a per-pixel embedding, with no convolution and no
position: the class is in how bright pixels sit relative to each other, which only the pLSTM's
state, carried from pixel to pixel along the grid's edges, can see. The model is

    pixel -> per-pixel MLP -> PLSTM2DP over the grid and over its mirror image
          -> sum and max over the pixels of each -> linear -> 4 logits

The cell's state C [K, V] lives on the grid's edges: a pixel (i, j) sums the states arriving from
(i-1, j) and (i, j-1), adds its own k v^T, and sends the result on to (i+1, j) and (i, j+1), split
between the two by a learned gate (P-mode: what comes in goes out, so nothing blows up over the
grid). One call runs the whole grid: plan sequential as a wavefront over the anti-diagonals
(X + Y - 1 levels, every pixel of a level at once), plan chunk by pLSTM's parallel form.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing rcc

import rcc  # noqa: E402

PLSTM_FILE = os.path.join(REPO, "stdlib", "plstm.rnn")
CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")
# (row step, column step) of each class's line; rows are the grid's first axis
DIRECTIONS = torch.tensor([[0, 1], [1, 0], [1, 1], [1, -1]])


def line_images(batch, size, line, noise, generator):
    """Images [batch, size, size] with one line of `line` bright pixels each, and labels [batch]."""
    labels = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    step = DIRECTIONS[labels]  # [batch, 2]
    # a start that keeps the whole line inside the image: rows in [0, size - span), columns
    # likewise, shifted right for the anti-diagonal (it moves left)
    span = (line - 1) * step.abs()
    row0 = (torch.rand(batch, generator=generator) * (size - span[:, 0])).long()
    col0 = (torch.rand(batch, generator=generator) * (size - span[:, 1])).long()
    col0 = col0 + torch.where(step[:, 1] < 0, span[:, 1], 0)
    along = torch.arange(line)
    rows = row0[:, None] + along * step[:, :1]  # [batch, line]
    cols = col0[:, None] + along * step[:, 1:]
    images = noise * torch.randn(batch, size, size, generator=generator)
    images[torch.arange(batch)[:, None], rows, cols] += 1.0
    return images, labels


class PLSTMClassifier(torch.nn.Module):
    """Two pLSTMs, one over the image and one over its mirror image (columns reversed), each
    pooled over the pixels; a linear head on the four pooled vectors."""

    def __init__(self, Cell, features: int, key_dim: int, value_dim: int, classes: int):
        super().__init__()
        # Per pixel only, so no neighbour is visible to it; without biases, and GELU(0) = 0, so a
        # dark pixel embeds near 0 and writes almost nothing (k v^T ~ 0) into the state: what
        # reaches a pixel is what the bright pixels upstream of it wrote.
        self.embed = torch.nn.Sequential(torch.nn.Linear(1, features, bias=False), torch.nn.GELU(),
                                         torch.nn.Linear(features, features, bias=False))
        # One pLSTM sees only what lies above and left of a pixel (its state flows down and
        # right), so two pixels of an anti-diagonal line never meet in it; in the mirror image
        # they lie on a diagonal. The paper averages four such orientations; two suffice here.
        self.cells = torch.nn.ModuleList(Cell(d_in=features, K=key_dim, V=value_dim)
                                         for _ in range(2))
        self.head = torch.nn.Linear(4 * value_dim, classes)

    def forward(self, images):
        x = self.embed(images[..., None])  # [B, X, Y, features]: the cell's input x[d_in]
        pooled = []
        for cell, view in zip(self.cells, (x, x.flip(2))):
            y, _final = cell(view)  # y [B, X, Y, V]; the final state (every edge's C) is unused
            # sum and max over the pixels: how much of the pattern there is, and its strongest
            # response (the sum is divided by the side to stay O(1) as the grid grows)
            pooled += [y.sum((1, 2)) / y.shape[1], y.amax((1, 2))]
        return self.head(torch.cat(pooled, -1))


@torch.no_grad()
def accuracy(model, batches, batch, size, line, noise, generator) -> float:
    correct = total = 0
    for _ in range(batches):
        images, labels = line_images(batch, size, line, noise, generator)
        correct += (model(images).argmax(1) == labels).sum().item()
        total += batch
    return correct / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=8, help="images are size x size (default 8)")
    parser.add_argument("--line", type=int, default=4, help="bright pixels per line (default 4)")
    parser.add_argument("--noise", type=float, default=0.2, help="std of the background noise")
    parser.add_argument("--features", type=int, default=16, help="the cell's d_in")
    parser.add_argument("--key-dim", type=int, default=16, help="the cell's K")
    parser.add_argument("--value-dim", type=int, default=16, help="the cell's V")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--plan", default="auto", choices=("auto", "sequential", "chunk"),
                        help="sequential: the wavefront; chunk: pLSTM's parallel form; "
                             "auto: the wavefront")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="fresh batches for the final accuracy (default 8)")
    args = parser.parse_args(argv)
    if not 2 <= args.line <= args.size:
        parser.error("need 2 <= --line <= --size")

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    PLSTM = rcc.compile(PLSTM_FILE, cell="PLSTM2DP", plan=args.plan)
    model = PLSTMClassifier(PLSTM, args.features, args.key_dim, args.value_dim, len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"cell {PLSTM.CELL} from stdlib/plstm.rnn, plan {args.plan}; "
          f"{sum(p.numel() for p in model.parameters())} parameters; {args.size}x{args.size} "
          f"images, lines of {args.line} pixels, noise {args.noise}; classes {', '.join(CLASSES)}; "
          f"batch {args.batch}, Adam lr {args.lr}")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = line_images(args.batch, args.size, args.line, args.noise, data)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s",
                  flush=True)

    evaluation = torch.Generator().manual_seed(args.seed + 2)
    acc = accuracy(model, args.eval_batches, 256, args.size, args.line, args.noise, evaluation)
    print(f"final accuracy {acc:.3f} on {args.eval_batches * 256} fresh images "
          f"(chance {1 / len(CLASSES):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
