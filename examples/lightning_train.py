"""UniTSFaceHead under PyTorch Lightning, class-parallel under its DDP strategy.

    python examples/lightning_train.py --devices 1      # one process, the whole head
    python examples/lightning_train.py --devices 2      # two processes, DDP over gloo (CPU):
                                                        # each rank holds half of the classes

The task is the synthetic identity task of examples/train_synthetic.py (identities are random
latent centres, samples are noisy copies pushed through a fixed nonlinearity).

Lightning's DDP strategy wraps the whole LightningModule, head included, in
DistributedDataParallel. A class-parallel head holds shards, not replicas, so it must stay out of
DDP's parameter set (unitsface_kernels/nn/ddp.py says why); the recipe is three lines:

* build the head in ``configure_model`` (it runs after torch.distributed is initialised, so the
  head shards itself, and before DDP wraps the module), then call
  ``ignore_shards_in_ddp(self)``: DDP neither broadcasts rank 0's shard nor averages the
  shards' gradients; the backbone stays data-parallel;
* clip the backbone's gradients only (``configure_gradient_clipping``);
* ``gather_shards`` / ``slice_shards`` in ``on_save_checkpoint`` / ``on_load_checkpoint``, so
  that the checkpoint rank 0 writes holds the whole head.

At the end every rank checks what it relies on (the ``checks`` of ``--report``): the backbone
is identical on every rank, each rank's head shard is its own (not rank 0's), and the head's
gradients were left as the head computed them while the backbone's were averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_synthetic import embedding_net, make_world, sample, world_arguments  # noqa: E402

from unitsface_kernels.nn import UniTSFaceHead  # noqa: E402
from unitsface_kernels.nn.ddp import gather_shards, ignore_shards_in_ddp, slice_shards  # noqa: E402


class FaceModel(L.LightningModule):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.backbone = embedding_net(args.input_dim, args.hidden, args.dim)
        self.head = None            # built in configure_model, once the ranks are known
        self.losses = []

    def configure_model(self):
        if self.head is not None:
            return
        # per rank: the head's initial rows and its partial-FC samples
        torch.manual_seed(self.args.seed + 1 + self.trainer.global_rank)
        self.head = UniTSFaceHead(self.args.dim, self.args.train_ids,
                                  sample_rate=self.args.sample_rate, backend=self.args.backend)
        ignore_shards_in_ddp(self)  # the head's shards are not DDP's replicas

    def training_step(self, batch, batch_idx):
        x, labels = batch
        with_uss = self.global_step >= self.args.softmax_steps  # official schedule
        loss = self.head(self.backbone(x), labels, with_uss=with_uss)  # global mean, all ranks
        self.losses.append(loss.item())
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), 10.0)  # never the shards

    def configure_optimizers(self):
        decay = [q for q in self.backbone.parameters() if q.dim() > 1] + [self.head.weight]
        no_decay = [q for q in self.backbone.parameters() if q.dim() <= 1] + [self.head.bias]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=self.args.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.args.lr, total_steps=self.args.steps,
            pct_start=min(0.5, max(0.1, 3 / self.args.steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        gather_shards(self, checkpoint["state_dict"])   # a collective: every rank calls it

    def on_load_checkpoint(self, checkpoint):
        slice_shards(self, checkpoint["state_dict"])


# ----------------------------------------------------------------------------- checks

class GradientSync(L.Callback):
    """Records, per step, how much DDP changed each gradient after autograd accumulated it:
    the backbone's are averaged over the ranks, the head's must be left alone."""

    def on_fit_start(self, trainer, model):
        self.local, self.changed = {}, {"backbone": 0.0, "head": 0.0}
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: self.local.__setitem__(name, p.grad.detach().clone()))

    def on_after_backward(self, trainer, model):
        for name, p in model.named_parameters():
            if name in self.local:
                part = name.split(".")[0]
                diff = float((p.grad - self.local[name]).abs().max())
                self.changed[part] = max(self.changed[part], diff)
        self.local.clear()


def cross_rank_checks(model, sync: GradientSync) -> dict:
    """On every rank (collectives): the largest difference of the backbone's parameters between
    ranks (its BatchNorm statistics are rank 0's as of the last forward, then updated locally,
    as DDP does), each rank's head rows and their sum, and the smallest difference between two
    ranks' head shards (zero padded to the same length)."""
    out = {"grad_change_by_ddp": sync.changed}
    if not (dist.is_available() and dist.is_initialized()):
        return out
    world, head = dist.get_world_size(), model.head
    flat = torch.cat([t.detach().double().reshape(-1) for t in model.backbone.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    out["backbone_max_diff"] = max(float((e - flat).abs().max()) for e in everyone)
    w = head.weight.detach()
    rows = w.new_zeros(math.ceil(head.num_classes / world), w.shape[1])
    rows[:w.shape[0]] = w
    shards = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(shards, rows)
    out["head_shard_min_diff"] = min(float((shards[a] - shards[b]).abs().max())
                                     for a in range(world) for b in range(a + 1, world))
    mine = ([head.class_start, head.class_start + head.num_local], float(w.double().sum()))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    out["head_shards"] = [bounds for bounds, _ in gathered]
    out["head_shard_sums"] = [total for _, total in gathered]
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=int, default=1, help="processes (DDP over gloo when > 1)")
    p.add_argument("--train-ids", type=int, default=300, help="identities (classes)")
    p.add_argument("--test-ids", type=int, default=0)
    p.add_argument("--per-id", type=int, default=20, help="training samples per identity")
    world_arguments(p, hidden=128, dim=64)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--softmax-steps", type=int, default=20, help="first steps without USS")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=0.5, help="partial FC (per shard)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write a checkpoint (the whole head) here at the end")
    p.add_argument("--report", help="rank 0 writes the losses and the checks here (JSON)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()

    g = torch.Generator().manual_seed(args.seed)  # the same data on every rank
    centres, to_input = make_world(args.train_ids + args.test_ids, args.latent, args.input_dim, g)
    x, y = sample(centres, torch.arange(args.train_ids), args.per_id, args.noise, to_input, g)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)  # Lightning adds a DistributedSampler under DDP

    model = FaceModel(args)
    sync = GradientSync()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=args.steps, max_epochs=-1, callbacks=[sync], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader)

    checks = cross_rank_checks(model, sync)
    if args.save:
        trainer.save_checkpoint(args.save)  # every rank: the head's rows are gathered
    if trainer.is_global_zero:
        losses = model.losses
        for step in list(range(0, len(losses), 10)) + [len(losses) - 1]:
            phase = "softmax + USS" if step >= args.softmax_steps else "softmax"
            print(f"step {step:3d}  loss {losses[step]:8.3f}  ({phase})")
        print(f"{trainer.world_size} process(es); head classes per rank: "
              f"{checks.get('head_shards', [[0, args.train_ids]])}; threshold b/s "
              f"{model.head.threshold:+.4f}")
        print("checks: " + json.dumps(checks))
        print(f"done in {time.perf_counter() - start:.1f} s")
        if args.report:
            with open(args.report, "w") as f:
                json.dump({"world_size": trainer.world_size, "losses": losses,
                           "softmax_steps": args.softmax_steps, "checks": checks,
                           "head_shape": list(model.head.weight.shape)}, f)
    return model, checks


if __name__ == "__main__":
    main()
