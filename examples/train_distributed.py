"""Class-parallel UniTSFace training with torch.distributed (insightface's PartialFC_V2 layout).

    torchrun --nproc_per_node=2 examples/train_distributed.py           # CPU: gloo, ~10 s
    torchrun --nproc_per_node=8 examples/train_distributed.py --classes 100000 --dim 512

The backbone is replicated and wrapped in DistributedDataParallel; the head is NOT: under
torch.distributed, :class:`~unitsface_kernels.nn.UniTSFaceHead` shards the classes, so rank r
holds only its rows [class_start, class_start + num_local) of the class centres and of the
memory bank. Every step all-gathers the embeddings and labels, each rank computes its shard's
per-row statistics with the fused kernels, two all-reduces of O(B_global) numbers combine
them, and the loss is the global mean on every rank. The backward gives each rank exactly
∂L/∂W of its shard, the full ∂L/∂b of the replicated unified threshold, and w·∂L/∂x to its own
embeddings, which DDP's average turns into ∂L/∂θ of the backbone.

The process-group backend follows the hardware: NCCL when CUDA is available (one GPU per
rank, LOCAL_RANK), gloo on CPUs. On CPUs without the compiled extension the per-shard step
uses the eager reference backend (same maths, same communication).

The data is the synthetic identity task of examples/train_synthetic.py, in small: identities
are random latent centres, samples are noisy copies pushed through a fixed nonlinearity, and
each rank draws its own batches. At the end rank 0 checks that every rank holds the same b and
the same backbone, and reports verification accuracy on unseen identities at the learned
threshold b/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_synthetic import embedding_net, make_world, sample, world_arguments  # noqa: E402

from unitsface_kernels.nn import UniTSFaceHead, pair_cosine  # noqa: E402


def setup():
    """init_process_group from torchrun's environment; NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:  # plain `python examples/train_distributed.py`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, default=301, help="training identities (sharded)")
    p.add_argument("--test-ids", type=int, default=100, help="unseen identities for the check")
    world_arguments(p)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--softmax-steps", type=int, default=60,
                   help="first steps without USS (the official schedule fills the bank first)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=0.5, help="partial FC, per shard")
    p.add_argument("--backend", default="auto", help="kernel backend of the head")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    log = print if rank == 0 else (lambda *a, **k: None)
    start = time.perf_counter()

    g_world = torch.Generator().manual_seed(args.seed)  # the same identities on every rank
    centres, to_input = make_world(args.classes + args.test_ids, args.latent, args.input_dim,
                                   g_world)
    g_data = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))  # per-rank batches

    torch.manual_seed(args.seed)  # the same initial backbone everywhere (DDP broadcasts too)
    net = DDP(embedding_net(args.input_dim, args.hidden, args.dim).to(device),
              device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # partial-FC sampling: independent per shard
    head = UniTSFaceHead(args.dim, args.classes, sample_rate=args.sample_rate,
                         backend=args.backend).to(device)
    shard = head.shard
    bounds = [None] * world
    dist.all_gather_object(bounds, (head.class_start, head.class_start + head.num_local))
    mib = (head.weight.numel() * head.weight.element_size()
           + head.bank.numel() * head.bank.element_size()) / 2**20
    log(f"{world} rank(s), {dist.get_backend()} on {device.type}; class shards {bounds}; "
        f"head memory per rank: {mib:.2f} MiB (centres + bank rows of the shard)")
    if shard is None:
        log("(one rank: the head is not sharded; run under torchrun --nproc_per_node=2)")

    decay = [q for q in net.parameters() if q.dim() > 1] + [head.weight]
    no_decay = [q for q in net.parameters() if q.dim() <= 1] + [head.bias]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    net.train()
    head.train()
    running = 0.0
    for step in range(args.steps):
        with_uss = step >= args.softmax_steps
        ids = torch.randint(0, args.classes, (args.batch_size,), generator=g_data)
        x = sample(centres, ids, 1, args.noise, to_input, g_data)[0].to(device)
        loss = head(net(x), ids.to(device), with_uss=with_uss)  # global mean, same on all ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clip the backbone only: its gradients are identical on every rank after DDP, while the
        # head's are shards (a norm over them would differ per rank and desynchronise DDP)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        sched.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"step {step:4d}  loss {running:9.3f}  threshold b/s {head.threshold:+.4f}"
                f"{'' if with_uss else '  (softmax only)'}")

    # every rank holds the same b and the same backbone (DDP + the all-reduced ∂b)
    b = head.bias.detach().double().reshape(1)
    flat = torch.cat([q.detach().reshape(-1) for q in net.parameters()]).double()
    check = torch.stack([b[0], flat.sum(), flat.square().sum()])
    everyone = [torch.empty_like(check) for _ in range(world)]
    dist.all_gather(everyone, check)
    drift = max(float((e - check).abs().max()) for e in everyone)
    log(f"max difference between ranks of b and the backbone: {drift:.3g}")

    if rank == 0:
        net.eval()
        g = torch.Generator().manual_seed(args.seed + 7)
        test_x, test_ids = sample(centres, torch.arange(args.classes, args.classes + args.test_ids),
                                  10, args.noise, to_input, g)
        with torch.no_grad():
            emb = net.module(test_x.to(device)).cpu()
        a = torch.randint(0, len(test_ids), (20000,), generator=g)
        c = torch.randint(0, len(test_ids), (20000,), generator=g)
        keep = a != c
        same = (test_ids[a] == test_ids[c])[keep]
        cos = pair_cosine(emb[a[keep]], emb[c[keep]])
        accept = cos > head.threshold
        acc_pos = float(accept[same].float().mean())
        acc_neg = float((~accept[~same]).float().mean())
        log(f"unseen identities at t = {head.threshold:.3f}: {acc_pos:.1%} of same-identity pairs "
            f"accepted, {acc_neg:.1%} of different-identity pairs rejected")
        log(f"done in {time.perf_counter() - start:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
