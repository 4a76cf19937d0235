"""Where a Ulysses BSA step's time goes on each rank: kernel time by kind under torch.profiler (a probe).

    torchrun --nproc-per-node 2 benchmarks/profile_ulysses.py        (153,600 tokens, 12 heads, D=128, bf16)

Per rank: wall time of one fwd+bwd step (synchronised), and the CUDA time of NCCL kernels, Flex
kernels and everything else within it; GPU idle time is what remains.
"""
import os
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import bsa_flex
from bsa_flex.distributed import ulysses_attention
from bsa_flex.synthetic import video_qkv

VIDEO, HEADS, DIM, STEPS = (40, 48, 80), 12, 128, 5

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
torch.cuda.set_device(device)
q, k, v = video_qkv(1, HEADS, HEADS, VIDEO, DIM, dtype=torch.bfloat16, device=device, seed=0)
S = q.shape[2]
shard = slice(rank * S // world, (rank + 1) * S // world)
local = [t[:, :, shard].clone().requires_grad_() for t in (q, k, v)]
grad = torch.randn_like(local[0])
config = bsa_flex.BSAConfig()


def step():
    ulysses_attention(*local, VIDEO, config).backward(grad)


for _ in range(3):
    step()
torch.cuda.synchronize()
dist.barrier()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / STEPS
kinds = {"nccl": 0.0, "flex": 0.0, "other": 0.0}
for e in prof.key_averages():
    name = e.key.lower()
    kind = "nccl" if "nccl" in name else "flex" if "flex" in name else "other"
    kinds[kind] += e.self_device_time_total / 1e3 / STEPS
row = {"rank": rank, "wall_ms": wall, **{f"{k}_ms": v for k, v in kinds.items()}}
rows = [None] * world
dist.all_gather_object(rows, row)
if rank == 0:
    top = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=70)
    print(top)
    for r in rows:
        busy = r["nccl_ms"] + r["flex_ms"] + r["other_ms"]
        print(f"rank {r['rank']}: step {r['wall_ms']:.2f} ms | NCCL kernels {r['nccl_ms']:.2f} | Flex kernels "
              f"{r['flex_ms']:.2f} | other kernels {r['other_ms']:.2f} | sum {busy:.2f} (NCCL overlaps others)")
dist.destroy_process_group()
