"""All-to-all bandwidth between the GPUs of one host, as Ulysses uses it (a probe).

    torchrun --nproc-per-node 2 benchmarks/probe_all_to_all.py

Times dist.all_to_all_single on one [1, 12, 76800, 128] bf16 shard (Ulysses' q at 153,600 tokens
on 2 ranks; half of it crosses to the other rank) with CUDA events, median of 20 after a barrier,
and each rank's plain peer copy of the same bytes (tensor.to(other GPU)). NCCL settings come from
the environment, so one run per setting shows what each does.
"""
import os

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
torch.cuda.set_device(device)
x = torch.randn(1, 12, 76800, 128, device=device, dtype=torch.bfloat16)
y = torch.empty_like(x)
crossing = x.numel() * x.element_size() * (world - 1) / world


def timed(fn, repeats=20):
    times = []
    for _ in range(repeats + 3):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[3:])[repeats // 2]


a2a_ms = timed(lambda: dist.all_to_all_single(y, x))
line = f"rank {rank}: all_to_all_single {a2a_ms:.3f} ms, {crossing / a2a_ms / 1e6:.1f} GB/s crossing each way"
other = torch.device(f"cuda:{(device.index + 1) % torch.cuda.device_count()}")
copy_ms = timed(lambda: x.to(other, non_blocking=True))  # every rank, so that the barriers pair up
line += (f" | peer copy of the whole shard {copy_ms:.3f} ms, {x.numel() * x.element_size() / copy_ms / 1e6:.1f} GB/s;"
         f" can_device_access_peer {torch.cuda.can_device_access_peer(device.index, other.index)}")
print(f"[{os.environ.get('A2A_LABEL', 'default')}] {line}", flush=True)
dist.destroy_process_group()
