"""Where BSA's time goes at Wan2.1 shapes: torch.profiler over a few fwd+bwd steps.

python benchmarks/profile_wan.py [S=23296|153600]; prints the top CUDA kernels and wall times.
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.synthetic import video_qkv

shapes = {23296: ((16, 28, 52), 24), 153600: ((40, 48, 80), 118)}
video_shape, budget = shapes[int(sys.argv[1]) if len(sys.argv) > 1 else 23296]
q, k, v = video_qkv(1, 12, 12, video_shape, 128, dtype=torch.bfloat16, device="cuda", seed=0, sharpness=2.0,
                    requires_grad=True)
go = torch.randn_like(q)
config = BSAConfig(kv_threshold=0.9, max_kv_blocks=budget)


def step():
    bsa_flex.attention(q, k, v, video_shape, config).backward(go)


out, stats = bsa_flex.attention(q, k, v, video_shape, config, return_stats=True)
out.backward(go)
print("sparsity", float(stats.sparsity), "kv density", float(stats.kv_density.mean()))
fwd = do_bench(lambda: bsa_flex.attention(q, k, v, video_shape, config), warmup=25, rep=100, return_mode="median")
fb = do_bench(step, warmup=25, rep=100, return_mode="median")
print(f"fwd {fwd:.3f} ms  fwd+bwd {fb:.3f} ms")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
print(table)
if os.environ.get("OUT"):
    prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"trace_{q.shape[2]}.json"))
    with open(os.path.join(os.environ["OUT"], f"profile_{q.shape[2]}.txt"), "w") as f:
        f.write(table)
