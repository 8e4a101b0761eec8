"""Train a small character-level language model whose token mixing is a compiled rcc cell:
gated linear attention (stdlib/gla.rnn) made a layer by rcc.Layer, then sample from it one
character at a time, carrying the cell's state between calls.

    python examples/language_model.py                  # 2 layers, 200 Adam steps on the built-in text
    python examples/language_model.py --steps 600 --plan sequential --sample-length 400

The model is a pre-norm stack of blocks, each `x + GLA(norm(x))` then `x + MLP(norm(x))`, between
an embedding and a linear head. The cell itself (S' = diag(exp(gk)) S + k v^T, o = q S' / sqrt(K))
has no parameters: rcc.Layer computes its inputs q, k, v and the log forget gate gk from the
residual stream for every head, the way flash-linear-attention's GLA layer does, and mixes the
heads' outputs back. rcc runs the recurrence over the whole window at once when training (plan
auto picks the chunkwise form on a CPU for these sizes) and step by step when generating: the
final state of one call is the initial state of the next, so generation costs O(1) per token.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing rcc

import rcc  # noqa: E402

GLA_FILE = os.path.join(REPO, "stdlib", "gla.rnn")

# The training text, written for this example (no download). A few hundred distinct character
# windows: the default model (2 layers, ~110k parameters) learns its spelling within a hundred
# steps and most of it by heart within two hundred, which is what the example needs to show the
# loss falling (it is a demonstration of the plumbing, not of generalisation).
TEXT = """\
The keeper of the lighthouse kept a logbook, and every evening he wrote the same three lines in it:
the wind, the sea, and the ships that passed. On calm nights the sea was flat and grey, the wind
came from the west, and no ships passed at all. On stormy nights the sea was white and loud, the
wind came from the north, and the ships passed close to the rocks, their lamps swinging. The keeper
trimmed the wick, wound the clockwork that turned the lens, and watched the beam sweep the water
once every ten seconds. He did not need to remember the nights that came before; the logbook
remembered them for him, one line at a time, and each new line only had to follow the last one.
In spring the birds came back to the island and nested under the gallery, and the keeper wrote
them into the logbook too: the wind, the sea, the ships, and the birds. In autumn the birds left,
the nights grew long, and the lamp burned from early evening until the grey light of morning.
"""


class Block(torch.nn.Module):
    def __init__(self, Cell, d_model, heads, key_dim, value_dim):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d_model)
        # rcc.Layer: per-head projections of x to the cell's inputs q, k, v and the forget gate
        # in log space (logsigmoid(.) / 16, as the GLA paper parametrises it: it starts near
        # -0.04, a decay of 0.96 per step), the cell over the heads, each head's output
        # RMS-normalised and gated by SiLU, then projected back (fla's GLA layer's shape)
        self.mix = rcc.Layer(Cell, d_model, heads,
                             {"gk": rcc.Feature("logsigmoid", divide=16)}, output_gate="silu",
                             K=key_dim, V=value_dim)
        self.norm2 = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x, state=None):
        """x [B, T, d_model]; state: the cell's S [B, heads, K, V] after the previous call, or
        None (zeros). Returns (x after the block, S after the last step)."""
        y, final = self.mix(self.norm1(x), initial_state=state)
        x = x + y
        return x + self.mlp(self.norm2(x)), final["S"]


class CharLM(torch.nn.Module):
    def __init__(self, Cell, vocab, d_model, layers, heads, key_dim, value_dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.blocks = torch.nn.ModuleList(Block(Cell, d_model, heads, key_dim, value_dim)
                                          for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens, states=None):
        """tokens [B, T] -> (logits [B, T, vocab], one cell state per layer). Pass the states
        returned by one call as `states` of the next to continue the same sequences."""
        x = self.embed(tokens)
        states = states if states is not None else [None] * len(self.blocks)
        finals = []
        for block, state in zip(self.blocks, states):
            x, final = block(x, state)
            finals.append(final)
        return self.head(self.norm(x)), finals


def windows(data, batch, length, generator):
    """`batch` random windows of length + 1 characters: inputs and next-character targets."""
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
    chunk = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def generate(model, prompt_ids, length, temperature, generator):
    """Read the prompt in one call, then feed back one sampled character per call, carrying every
    layer's state: each call runs the cell for T = 1 step from the state the last one left."""
    logits, states = model(prompt_ids[None])
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, -1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(int(nxt))
        logits, states = model(nxt[None], states)
    return out


@torch.no_grad()
def incremental_matches_full(model, ids):
    """The largest difference between the logits of one call over `ids` and those of calls of one
    character each, carrying the state: the two must agree (up to float rounding)."""
    full, _ = model(ids[None])
    states, steps = None, []
    for t in range(len(ids)):
        logits, states = model(ids[None, t:t + 1], states)
        steps.append(logits)
    return (torch.cat(steps, 1) - full).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="Adam steps (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16, help="K = V of each head (default 16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="training window in characters")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plan", default="auto", choices=("auto", "sequential", "scan", "chunk"),
                        help="how rcc runs GLA over time (every plan computes the same function)")
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps")
    parser.add_argument("--prompt", default="The keeper ")
    parser.add_argument("--sample-length", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    if args.length + 1 >= len(TEXT):
        parser.error(f"--length must be below {len(TEXT) - 1} (the text's length)")

    torch.manual_seed(args.seed)
    sampler = torch.Generator().manual_seed(args.seed + 1)
    chars = sorted(set(TEXT))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in TEXT])
    unknown = sorted(set(args.prompt) - set(chars))
    if unknown:
        parser.error(f"--prompt has characters not in the text: {''.join(unknown)!r}")

    GLA = rcc.compile(GLA_FILE, plan=args.plan)
    model = CharLM(GLA, len(chars), args.d_model, args.layers, args.heads, args.head_dim,
                   args.head_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"cell {GLA.CELL} from stdlib/gla.rnn, plan {args.plan}; {args.layers} layers, d_model "
          f"{args.d_model}, {args.heads} heads of {args.head_dim}, "
          f"{sum(p.numel() for p in model.parameters())} parameters; {len(TEXT)} characters, "
          f"vocabulary {len(chars)} (uniform loss {math.log(len(chars)):.2f}); windows of "
          f"{args.length}, batch {args.batch}")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = windows(data, args.batch, args.length, sampler)
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, len(chars)), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s",
                  flush=True)

    model.eval()
    probe = data[:48]
    print(f"one character per call vs one call for 48 characters: max |diff| of the logits "
          f"{incremental_matches_full(model, probe):.2e}")
    prompt_ids = torch.tensor([index[c] for c in args.prompt])
    sampled = generate(model, prompt_ids, args.sample_length, args.temperature, sampler)
    print(f"sample (temperature {args.temperature}):")
    print(args.prompt + "".join(chars[i] for i in sampled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
