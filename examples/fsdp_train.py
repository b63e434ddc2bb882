"""LoRA fine-tuning with FSDP2: each rank holds 1/N of every weight, gathered block by block as the step runs.

    torchrun --nproc_per_node=2 examples/fsdp_train.py           # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nnodes=M --node_rank=I --master_addr=HOST --nproc_per_node=N examples/fsdp_train.py

Compile first, then shard the compiled model's repeated blocks and its root, as torchtitan does. Trains a small
random Llama on random tokens (no downloads); --out saves the adapters (gathered, written by rank 0) and a
distributed checkpoint of adapters + optimizer (each rank its shards) that --resume continues from.
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import peftc
from peftc.distributed import full_adapter_state_dict, load_checkpoint, save_checkpoint

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
    mesh = init_device_mesh(device.type, (world,))

    # Same seed on every rank: the same base weights and adapter init before sharding.
    model, example = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=128, seq=args.seq, batch=args.batch)
    model.to(device)  # compile on the device it will run on: the graph keeps the devices it was captured with
    ids = example["input_ids"].to(device)
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16), prune_grads=True,
                       kwargs={"input_ids": ids, "labels": ids.clone()})
    cm.train()
    for block in cm.model.layers:  # each decoder layer gathers its weights in its own call
        fully_shard(block, mesh=mesh)
    fully_shard(cm, mesh=mesh)  # the rest: embeddings, final norm, head
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-3)
    if args.resume:
        load_checkpoint(cm, args.out / "checkpoint", opt)

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of the data
    for step in range(args.steps):
        batch = torch.randint(0, 128, (args.batch, args.seq), generator=data).to(device)
        loss = cm(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item() / world:.4f}", flush=True)

    if args.out is not None:
        save_checkpoint(cm, args.out / "checkpoint", opt)
        adapters = full_adapter_state_dict(cm)  # a collective: every rank gathers
        if rank == 0:
            torch.save({k: v.cpu() for k, v in adapters.items()}, args.out / "adapters.pt")
            print(f"saved {args.out / 'adapters.pt'} and {args.out / 'checkpoint'}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
