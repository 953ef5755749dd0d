"""Capture a whole UniTSFaceHead training step with partial FC — forward, backward, the deferred
memory-bank update and the SparseSGD step — in one CUDA graph, replay it over new batches
copied into static inputs, and compare it with the same steps run eagerly.

    python examples/capture_step.py                       # small sizes
    python examples/capture_step.py --classes 100000 --batch 512 --dim 512 --steps 50

What makes the step capturable (README, "Capturing a training step"):

* ``unitsface_kernels.checks("async")`` (and the capture itself) turns the value checks into
  device asserts: nothing is read back;
* partial FC then samples exactly int(sample_rate·C) classes (a fixed size), holding every
  class of the batch;
* the threshold's data-dependent initialisation is chosen on the device;
* ``SparseSGD(capturable=True)`` keeps its lazy-row bookkeeping on the device; its ``lr`` is a
  tensor, so the learning-rate schedule reaches the replayed graph.

The captured replays and the eager steps start from the same state and the same random
state: the script prints the largest difference of the losses, threshold, bank and weights
(zero where the kernels are deterministic) and the time per step, eager and replayed, and
with ``--profile`` the kernel launches per eager step. It then runs the same step through
``torch.compile(mode="reduce-overhead")``. Without CUDA it runs the step eagerly in the async
checks mode and says that capture needs a GPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import unitsface_kernels as uk
from unitsface_kernels.nn import UniTSFaceHead
from unitsface_kernels.optim import SparseSGD


def build(args, device):
    torch.manual_seed(0)
    head = UniTSFaceHead(args.dim, args.classes, sample_rate=args.sample_rate, sparse_grad=True,
                         backend=args.backend).to(device)
    return head, copy.deepcopy(head)


def optimizer(head, device):
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)  # the schedule reaches a graph
    opt = SparseSGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, capturable=True)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)


def batches(args, device, count, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # at most num_sample distinct classes per batch: the fixed-size sample holds them all
    ids = max(1, min(args.batch, int(args.sample_rate * args.classes)))
    out = []
    for _ in range(count):
        labels = torch.randint(0, args.classes, (ids,), generator=g)
        labels = labels[torch.randint(0, ids, (args.batch,), generator=g)]
        x = torch.randn(args.batch, args.dim, generator=g).to(device, getattr(torch, args.dtype))
        out.append((x, labels.to(device)))
    return out


def train_step(head, opt, x, labels):
    loss = head(x, labels)
    loss.backward()
    opt.step()
    return loss


def state(head, opt):
    opt.catch_up_all()  # bring lazily stepped rows up to date before reading them
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(),
            "bank": head.bank.clone(), "bank_valid": head.bank_valid.clone()}


def max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def timed(fn, n, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def launches(fn):
    """CUDA kernels launched by one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20, help="replayed (and eager) steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the embeddings' dtype (a mixed-precision backbone's output; the head's "
                        "weights and bank stay fp32, read rounded to it)")
    p.add_argument("--profile", action="store_true", help="count the launches of an eager step")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile(mode='reduce-overhead') (its compile takes a minute)")
    args = p.parse_args()
    uk.checks("async")  # no read-back anywhere: what a captured step needs

    if not torch.cuda.is_available():
        device = torch.device("cpu")
        head, _ = build(args, device)
        opt, schedule = optimizer(head, device)
        for x, labels in batches(args, device, args.steps, seed=1):
            opt.zero_grad(set_to_none=True)
            loss = train_step(head, opt, x, labels)
            schedule.step()
        print(f"no CUDA device: ran {args.steps} steps eagerly in the async checks mode (last "
              f"loss {float(loss.detach()):.4f}, threshold {head.threshold:.4f}); capturing the "
              "step in a CUDA graph needs a GPU")
        return

    device = torch.device("cuda")
    graph_head, eager_head = build(args, device)
    (graph_opt, graph_sched), (eager_opt, eager_sched) = (optimizer(graph_head, device),
                                                          optimizer(eager_head, device))
    warm = batches(args, device, args.warmup, seed=1)
    data = batches(args, device, args.steps, seed=2)
    static_x, static_labels = (t.clone() for t in data[0])

    # warm-up (on a side stream, as torch.cuda.graph asks), the same steps for both heads
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i, (x, labels) in enumerate(warm):
            torch.cuda.manual_seed(100 + i)
            graph_opt.zero_grad(set_to_none=True)
            train_step(graph_head, graph_opt, x, labels)
    torch.cuda.current_stream().wait_stream(side)
    for i, (x, labels) in enumerate(warm):
        torch.cuda.manual_seed(100 + i)
        eager_opt.zero_grad(set_to_none=True)
        train_step(eager_head, eager_opt, x, labels)

    graph = torch.cuda.CUDAGraph()
    graph_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # records the kernels; none runs now
        static_loss = train_step(graph_head, graph_opt, static_x, static_labels)

    torch.cuda.manual_seed(7)
    graph_losses = []
    for x, labels in data:
        static_x.copy_(x)
        static_labels.copy_(labels)
        graph.replay()
        graph_losses.append(static_loss.clone())
        graph_sched.step()
    torch.cuda.manual_seed(7)
    eager_losses = []
    for x, labels in data:
        eager_opt.zero_grad(set_to_none=True)
        eager_losses.append(train_step(eager_head, eager_opt, x, labels).detach())
        eager_sched.step()

    losses = torch.stack(graph_losses), torch.stack(eager_losses)
    got, want = state(graph_head, graph_opt), state(eager_head, eager_opt)
    print(f"B={args.batch} D={args.dim} C={args.classes} |S|={graph_head.num_sample} "
          f"{args.dtype} backend={args.backend} on {torch.cuda.get_device_name()}")
    print(f"replayed vs eager over {args.steps} steps: losses equal bit for bit: "
          f"{torch.equal(*losses)} (max |Δ| {float((losses[0] - losses[1]).abs().max()):.3g}); "
          f"threshold, bank, weights max |Δ| {max_diff(got, want):.3g}")

    def eager_once():
        eager_opt.zero_grad(set_to_none=True)
        train_step(eager_head, eager_opt, static_x, static_labels)

    t_eager = timed(eager_once, args.steps, device)
    t_graph = timed(graph.replay, args.steps, device)
    print(f"step time: eager {t_eager * 1e3:.3f} ms, replayed graph {t_graph * 1e3:.3f} ms")
    if args.profile:
        print(f"kernel launches per eager step: {launches(eager_once)} "
              f"(one graph launch when replayed)")

    if args.no_compile:
        return
    compiled = torch.compile(eager_head, mode="reduce-overhead")
    for x, labels in data[:5]:
        eager_opt.zero_grad(set_to_none=True)
        loss = train_step(compiled, eager_opt, x, labels)
    print(f"torch.compile(mode='reduce-overhead'): 5 steps ran, last loss "
          f"{float(loss.detach()):.4f}")


if __name__ == "__main__":
    main()
