"""Is BSA host-bound at 23,296 tokens? Enqueue time vs GPU time, and the same step under CUDA graphs (a probe).

    PYTHONPATH=$PWD python benchmarks/probe_host_bound.py [S=23296|153600]

Prints, for fwd+bwd of bsa_flex.attention as a user calls it (same config as the bench's Wan
case, threshold fixed): do_bench median; CPU time to enqueue one step while the GPU is kept busy
(so no wait is counted); the sum of CUDA kernel times of one step (profiler); and the replay time
of the same step captured with torch.cuda.make_graphed_callables (if capture works).
"""
import math
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.bench import WAN_CASES, Setup, _inputs

video_shape = {math.prod(shape): shape for shape, _ in WAN_CASES}[int(sys.argv[1]) if len(sys.argv) > 1 else 23296]
q, k, v, go = _inputs(video_shape, Setup(12, 128, torch.bfloat16, torch.device("cuda"), BSAConfig()))  # the bench's inputs
config = BSAConfig(kv_threshold=0.5)
attend = lambda q, k, v: bsa_flex.attention(q, k, v, video_shape, config)  # noqa: E731


def step():
    attend(q, k, v).backward(go)


out, stats = bsa_flex.attention(q, k, v, video_shape, config, return_stats=True)
out.backward(go)
print(f"S={q.shape[2]} sparsity {float(stats.sparsity):.3f}", flush=True)
t_bench = do_bench(step, warmup=25, rep=200, return_mode="median")

enqueue = []
for _ in range(20):
    torch.cuda._sleep(200_000_000)  # keep the GPU busy (~100 ms) so enqueueing never waits on it
    t0 = time.perf_counter()
    step()
    enqueue.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
t_enqueue = sorted(enqueue)[len(enqueue) // 2]

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) / 5
print(f"do_bench fwd+bwd {t_bench:.3f} ms | CPU enqueue of one step {t_enqueue:.3f} ms | "
      f"sum of kernel times {kernel_us / 1e3:.3f} ms", flush=True)

try:
    graphed = torch.cuda.make_graphed_callables(attend, (q, k, v))
    t_graph = do_bench(lambda: graphed(q, k, v).backward(go), warmup=25, rep=200, return_mode="median")
    same = torch.equal(graphed(q, k, v), attend(q, k, v))
    print(f"CUDA graph replay fwd+bwd {t_graph:.3f} ms (output equal to eager call: {same})")
except Exception as e:  # a probe: report why capture failed
    print(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:300]}")
