"""Are BSA's input gradients bit-identical from one run to the next on the same inputs? (a probe)

    PYTHONPATH=$PWD python benchmarks/probe_grad_determinism.py [S=23296|153600]

Written after Ulysses' gradients differed from single-process BSA's by up to 0.25 (relative L2
3e-3, bf16) while the outputs were bit-identical. Suspect: the backward of the gathers (the fill
copies many tokens' outputs from one kept row) accumulates with atomics, so its summation order
varies from run to run. Runs fwd+bwd several times per keep ratio and prints, per gradient, the
largest difference to the first run and its relative L2.
"""
import math
import sys
import warnings

import torch

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.bench import WAN_CASES, Setup, _inputs

warnings.simplefilter("ignore")
video_shape = {math.prod(shape): shape for shape, _ in WAN_CASES}[int(sys.argv[1]) if len(sys.argv) > 1 else 23296]
q, k, v, go = _inputs(video_shape, Setup(12, 128, torch.bfloat16, torch.device("cuda"), BSAConfig()))
print(f"{torch.cuda.get_device_name()} torch {torch.__version__} S={q.shape[2]}", flush=True)
for keep in (0.5, 1.0):
    config = BSAConfig(kv_threshold=0.5, query_keep_ratio=keep)
    runs = []
    for _ in range(4):
        q.grad = k.grad = v.grad = None
        bsa_flex.attention(q, k, v, video_shape, config).backward(go)
        runs.append([t.grad.clone() for t in (q, k, v)])
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2)):
        diffs = [(r[i].float() - runs[0][i].float()) for r in runs[1:]]
        print(f"keep {keep} {name}: max |diff| to run 1 {max(float(d.abs().max()) for d in diffs):.3e}, "
              f"rel. L2 {max(float(d.norm() / runs[0][i].float().norm()) for d in diffs):.1e}, "
              f"max |grad| {float(runs[0][i].abs().max()):.2e}", flush=True)
