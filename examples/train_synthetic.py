"""Train a small embedding network with UniTSFaceHead on a synthetic identity task and check
that the learned unified threshold verifies *unseen* identities.

The data: every identity is a random centre in a latent space; a sample is its centre plus
noise, pushed through a fixed random nonlinearity to give the network's input. Training uses
the train identities only; verification pairs (same / different identity) are built from
identities that the network never saw, and are accepted when cos(a, b) > head.threshold.

The schedule is the official one: the first epoch trains the softmax alone (while it fills the
memory bank), USS joins from the second epoch, where b is initialised from the data.

    python examples/train_synthetic.py                 # about 10 s on 2 idle CPU cores
    python examples/train_synthetic.py --out /tmp/h.png --sample-rate 0.3

It prints the learned threshold t = b/s, the verification accuracy of unseen-identity pairs
at t next to the accuracy at the best threshold chosen on those pairs, and saves a histogram
of the positive / negative pair cosines with both thresholds drawn. USS sets b against the
negatives of *all* classes, so t sits at the low-false-accept end of the gap between the two
histograms.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from unitsface_kernels.nn import UniTSFaceHead, pair_cosine


def world_arguments(p: argparse.ArgumentParser, hidden: int = 256, dim: int = 128) -> None:
    """The synthetic task's and the network's sizes (shared by the other examples)."""
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--dim", type=int, default=dim, help="embedding size")
    p.add_argument("--noise", type=float, default=0.25, help="within-identity spread (latent)")


def make_world(n_ids: int, latent: int, input_dim: int, g: torch.Generator):
    """Identity centres (train and unseen test) and the fixed input map latent → input."""
    centres = torch.randn(n_ids, latent, generator=g)
    mix1 = torch.randn(latent, input_dim, generator=g) / math.sqrt(latent)
    mix2 = torch.randn(input_dim, input_dim, generator=g) / math.sqrt(input_dim)

    def to_input(z):  # a fixed random nonlinearity: what the network has to undo
        h = torch.tanh(1.5 * z @ mix1)
        return torch.tanh(2.0 * h @ mix2) + 0.3 * h

    return centres, to_input


def sample(centres, ids, per_id, noise, to_input, g):
    ids = ids.repeat_interleave(per_id)
    z = centres[ids] + noise * torch.randn(len(ids), centres.shape[1], generator=g)
    return to_input(z), ids


def embedding_net(input_dim: int, hidden: int, dim: int) -> nn.Module:
    """A small MLP with the face-recognition tail (BatchNorm on the embedding)."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.BatchNorm1d(hidden), nn.PReLU(hidden),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.PReLU(hidden),
                         nn.Linear(hidden, dim), nn.BatchNorm1d(dim))


def verification_pairs(labels: torch.Tensor, n_pairs: int, g: torch.Generator):
    """n_pairs positive and n_pairs negative index pairs over the given samples."""
    n = len(labels)
    pos_a, pos_b, neg_a, neg_b = [], [], [], []
    while len(pos_a) < n_pairs or len(neg_a) < n_pairs:
        a = torch.randint(0, n, (4 * n_pairs,), generator=g)
        b = torch.randint(0, n, (4 * n_pairs,), generator=g)
        same = (labels[a] == labels[b]) & (a != b)
        diff = labels[a] != labels[b]
        pos_a += a[same].tolist()
        pos_b += b[same].tolist()
        neg_a += a[diff].tolist()
        neg_b += b[diff].tolist()
    pa, pb = torch.tensor(pos_a[:n_pairs]), torch.tensor(pos_b[:n_pairs])
    na, nb = torch.tensor(neg_a[:n_pairs]), torch.tensor(neg_b[:n_pairs])
    return (pa, pb), (na, nb)


def best_threshold(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, float]:
    """The threshold (midpoint between neighbouring scores) with the best accuracy."""
    scores = torch.cat([pos, neg]).double()
    truth = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).double()
    order = scores.argsort(descending=True)
    s, t = scores[order], truth[order]
    # accept the top k: correct = positives among them + negatives below them
    correct = torch.cat([t.new_zeros(1), t.cumsum(0)]) + (
        len(neg) - torch.cat([t.new_zeros(1), (1 - t).cumsum(0)]))
    k = int(correct.argmax())
    if k == 0:
        thr = float(s[0]) + 1e-6
    elif k == len(s):
        thr = float(s[-1]) - 1e-6
    else:
        thr = float(s[k - 1] + s[k]) / 2
    return thr, float(correct[k]) / len(s)


def accuracy(pos: torch.Tensor, neg: torch.Tensor, thr: float) -> float:
    return float((pos > thr).sum() + (neg <= thr).sum()) / (len(pos) + len(neg))


def save_histogram(path, pos, neg, learned, best):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(-1, 1, 101).numpy()
    ax.hist(neg.numpy(), bins=bins, alpha=0.6, label="different identity", color="tab:red")
    ax.hist(pos.numpy(), bins=bins, alpha=0.6, label="same identity", color="tab:blue")
    ax.axvline(learned, color="k", lw=2, label=f"learned threshold b/s = {learned:.3f}")
    ax.axvline(best, color="gray", ls="--", lw=1.5, label=f"best threshold = {best:.3f}")
    ax.set_xlabel("cosine similarity (unseen identities)")
    ax.set_ylabel("pairs")
    ax.set_title("UniTSFace head on a synthetic identity task")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-ids", type=int, default=300)
    p.add_argument("--test-ids", type=int, default=100)
    p.add_argument("--per-id", type=int, default=40, help="training samples per identity")
    p.add_argument("--test-per-id", type=int, default=20)
    world_arguments(p)
    p.add_argument("--epochs", type=int, default=8, help="the first one trains softmax only")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=1.0, help="partial-FC rate")
    p.add_argument("--pairs", type=int, default=3000, help="positive (and negative) test pairs")
    p.add_argument("--fresh", type=int, default=1,
                   help="1: draw new training samples every epoch; 0: a fixed training set")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the model is tiny: more threads only add overhead)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples/synthetic_histogram.png",
                   help="where to save the pair-cosine histogram (PNG)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    centres, to_input = make_world(args.train_ids + args.test_ids, args.latent, args.input_dim, g)
    train_x, train_y = sample(centres, torch.arange(args.train_ids), args.per_id, args.noise,
                              to_input, g)
    test_ids = torch.arange(args.train_ids, args.train_ids + args.test_ids)
    test_x, test_y = sample(centres, test_ids, args.test_per_id, args.noise, to_input, g)
    print(f"train: {args.train_ids} identities x {args.per_id} samples; test: "
          f"{args.test_ids} unseen identities x {args.test_per_id} samples")

    net = embedding_net(args.input_dim, args.hidden, args.dim)
    head = UniTSFaceHead(args.dim, args.train_ids, sample_rate=args.sample_rate,
                         backend=args.backend)
    decay = [q for q in net.parameters() if q.dim() > 1] + [head.weight]
    no_decay = [q for q in net.parameters() if q.dim() <= 1] + [head.bias]  # b: no decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1)

    for epoch in range(args.epochs):
        with_uss = epoch > 0  # official schedule: USS from the second epoch
        net.train()
        head.train()
        if args.fresh and epoch > 0:  # new noise draws: the task is the identities, not samples
            train_x, train_y = sample(centres, torch.arange(args.train_ids), args.per_id,
                                      args.noise, to_input, g)
        order = torch.randperm(len(train_y), generator=g)
        bar = tqdm(order.split(args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs} "
                   f"({'softmax + USS' if with_uss else 'softmax'})", leave=True,
                   dynamic_ncols=True)
        total = 0.0
        for i, idx in enumerate(bar):
            loss = head(net(train_x[idx]), train_y[idx], with_uss=with_uss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(net.parameters()) + list(head.parameters()), 10.0)
            opt.step()
            sched.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (i + 1):.3f}", t=f"{head.threshold:.3f}",
                            refresh=False)

    net.eval()
    head.eval()
    with torch.no_grad():
        emb = net(test_x)
        seen_x, seen_y = sample(centres, torch.arange(args.train_ids)[:args.test_ids],
                                args.test_per_id, args.noise, to_input, g)
        seen = net(seen_x)
    (sa, sb), (ta, tb) = verification_pairs(seen_y, args.pairs, g)
    seen_acc = accuracy(pair_cosine(seen[sa], seen[sb]), pair_cosine(seen[ta], seen[tb]),
                        head.threshold)
    (pa, pb), (na, nb) = verification_pairs(test_y, args.pairs, g)
    pos, neg = pair_cosine(emb[pa], emb[pb]), pair_cosine(emb[na], emb[nb])
    learned = head.threshold
    # deployment: head.verify(a, b) is cos(a, b) > the learned threshold
    false_reject = float((~head.verify(emb[pa], emb[pb])).float().mean())
    false_accept = float(head.verify(emb[na], emb[nb]).float().mean())
    acc = 1 - (false_reject + false_accept) / 2
    best, best_acc = best_threshold(pos, neg)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_histogram(args.out, pos, neg, learned, best)

    print(f"learned threshold  t = b/s = {learned:.4f}  (b = {head.bias.item():.3f}, "
          f"s = {head.scale:g})")
    print(f"unseen-identity verification, {args.pairs} positive + {args.pairs} negative pairs:")
    print(f"  accuracy at the learned threshold {learned:+.4f}: {100 * acc:.2f}%")
    print(f"    (false accepts {100 * false_accept:.2f}%, false rejects {100 * false_reject:.2f}%)")
    print(f"  accuracy at the best threshold    {best:+.4f}: {100 * best_acc:.2f}%")
    print(f"  for comparison, new samples of {args.test_ids} training identities at the learned "
          f"threshold: {100 * seen_acc:.2f}%")
    print(f"  positive cos mean {float(pos.mean()):.3f}, negative cos mean "
          f"{float(neg.mean()):.3f}")
    print(f"histogram: {args.out}")
    print(f"runtime: {time.perf_counter() - start:.1f} s (backend={args.backend!r})")
    return acc, best_acc


if __name__ == "__main__":
    main()
