"""What is live at BSA's peak memory at 153,600 tokens (a probe): the largest blocks and where they came from.

    PYTHONPATH=$PWD python benchmarks/probe_memory.py [S=153600|23296]

One warm fwd+bwd under torch.cuda.memory._record_memory_history; replays the trace to find the
moment of peak and prints the 20 largest live blocks then, with their innermost Python frames outside
torch's own files (Inductor's generated code included); SDPA's peak on the same inputs for comparison.
"""
import math
import sys

import torch
import torch.nn.functional as F

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.bench import WAN_CASES, Setup, _inputs

video_shape = {math.prod(shape): shape for shape, _ in WAN_CASES}[int(sys.argv[1]) if len(sys.argv) > 1 else 153600]
q, k, v, go = _inputs(video_shape, Setup(12, 128, torch.bfloat16, torch.device("cuda"), BSAConfig()))  # the bench's inputs
config = BSAConfig(kv_threshold=0.5)
GiB = 2 ** 30


def peak_over_base(fn):
    fn()
    torch.cuda.synchronize()
    q.grad = k.grad = v.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    q.grad = k.grad = v.grad = None
    return (torch.cuda.max_memory_allocated() - base) / GiB, base / GiB


print("SDPA peak over base %.3f GiB (base %.3f)" % peak_over_base(lambda: F.scaled_dot_product_attention(q, k, v).backward(go)))
step = lambda: bsa_flex.attention(q, k, v, video_shape, config).backward(go)  # noqa: E731
print("BSA  peak over base %.3f GiB (base %.3f)" % peak_over_base(step), flush=True)

torch.cuda.memory._record_memory_history(max_entries=200_000)
step()
torch.cuda.synchronize()
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
live, total, best = {}, 0, (0, {})
for event in snap["device_traces"][0]:
    if event["action"] == "alloc":
        live[event["addr"]] = event
        total += event["size"]
        if total > best[0]:
            best = (total, dict(live))
    elif event["action"] == "free_completed" and event["addr"] in live:
        total -= live.pop(event["addr"])["size"]
print(f"peak of blocks allocated during the step: {best[0] / GiB:.3f} GiB in {len(best[1])} blocks")
for event in sorted(best[1].values(), key=lambda e: -e["size"])[:20]:
    frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in event.get("frames", [])
              if f["filename"].endswith(".py") and ("/torch/" not in f["filename"] or "torchinductor" in f["filename"])][:3]
    print(f"{event['size'] / 2**20:9.1f} MiB  " + " <- ".join(frames))
