"""LoRA fine-tuning with DistributedDataParallel: every rank holds the whole model, only adapter gradients travel.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nnodes=M --node_rank=I --master_addr=HOST --nproc_per_node=N examples/ddp_train.py

Trains a small random Llama on random tokens (no downloads); --out saves the adapters (rank 0) and a distributed
checkpoint of adapters + optimizer that --resume continues from. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import peftc
from peftc.distributed import load_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import tiny_llama  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--out", type=Path, help="directory for adapters.pt and the checkpoint")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # Same seed on every rank: the same base weights and adapter init (DDP also broadcasts rank 0's).
    model, example = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=128, seq=args.seq, batch=args.batch)
    model.to(device)  # compile on the device it will run on: the graph keeps the devices it was captured with
    ids = example["input_ids"].to(device)
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16), prune_grads=True,
                       kwargs={"input_ids": ids, "labels": ids.clone()})
    cm.train()
    ddp = DDP(cm, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-3)
    if args.resume:
        load_checkpoint(ddp, args.out / "checkpoint", opt)

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of the data
    for step in range(args.steps):
        batch = torch.randint(0, 128, (args.batch, args.seq), generator=data).to(device)
        loss = ddp(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item() / world:.4f}", flush=True)

    if args.out is not None:
        save_checkpoint(ddp, args.out / "checkpoint", opt)
        if rank == 0:
            torch.save(cm.adapter_state_dict(), args.out / "adapters.pt")
            print(f"saved {args.out / 'adapters.pt'} and {args.out / 'checkpoint'}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
