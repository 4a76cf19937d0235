"""Does BSA run under torch.compile(mode="reduce-overhead") (CUDA graphs), and what does it save? (a probe)

    TORCH_LOGS=perf_hints PYTHONPATH=$PWD python benchmarks/probe_cudagraphs.py [S=23296|153600]

At 23,296 tokens one fwd+bwd takes about as long to enqueue on the CPU as its kernels take on
the GPU (probe_host_bound.py), so replaying a CUDA graph could remove the host's share. For each
keep ratio, times fwd+bwd (do_bench median) of bsa_flex.attention called eagerly (its own
compiled graph) and inside a caller's torch.compile with mode "default" and "reduce-overhead",
and compares each output with the eager call's. perf_hints logs say why Inductor skipped
CUDA graphs, if it did.
"""
import math
import sys
import warnings

import torch
from triton.testing import do_bench

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.bench import WAN_CASES, Setup, _inputs

warnings.simplefilter("ignore")
video_shape = {math.prod(shape): shape for shape, _ in WAN_CASES}[int(sys.argv[1]) if len(sys.argv) > 1 else 23296]
q, k, v, go = _inputs(video_shape, Setup(12, 128, torch.bfloat16, torch.device("cuda"), BSAConfig()))
print(f"{torch.cuda.get_device_name()} torch {torch.__version__} S={q.shape[2]}", flush=True)
rows = []
for keep in (0.5, 1.0):
    config = BSAConfig(kv_threshold=0.5, query_keep_ratio=keep)

    def attend(q, k, v):
        return bsa_flex.attention(q, k, v, video_shape, config)

    reference = attend(q, k, v).detach().clone()
    for mode in ("eager call", "default", "reduce-overhead"):
        fn = attend if mode == "eager call" else torch.compile(attend, mode=mode, fullgraph=True, dynamic=False)

        def step():
            fn(q, k, v).backward(go)
            q.grad = k.grad = v.grad = None  # a new step, as in training (zero_grad(set_to_none))

        try:
            for _ in range(3):  # compile, record, then replay
                step()
            out = fn(q, k, v).detach().clone()
            ms = do_bench(step, warmup=25, rep=200, return_mode="median")
            rows.append((keep, mode, f"{ms:.3f}", f"{float((out.float() - reference.float()).abs().max()):.2e}"))
        except Exception as e:  # a probe: report the failure and go on
            rows.append((keep, mode, "failed", f"{type(e).__name__}: {str(e)[:200]}"))
        print(rows[-1], flush=True)
print("keep | mode | fwd+bwd ms | max |output - eager call|")
for row in rows:
    print(" | ".join(map(str, row)))
