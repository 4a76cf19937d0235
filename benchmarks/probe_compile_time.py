"""How long bsa_flex.attention takes to compile forward+backward, per variant (a probe, not a test).

    PYTHONPATH=$PWD python benchmarks/probe_compile_time.py VARIANT     (one variant per process)

Variants differ in one thing each from the training example's graph (B=2, 6 heads, D=64,
16x32x32 tokens, bf16, keep 0.5, block 128, KV budget 19 blocks, called under autocast).
Prints one line: variant, seconds of the first fwd+bwd call (the compile), seconds of the second.
"""
import contextlib
import sys
import time

import torch

import bsa_flex
from bsa_flex.synthetic import video_qkv

VARIANTS = {  # name: (batch, heads, head_dim, max_kv_blocks, autocast)
    "training": (2, 6, 64, 19, True),
    "no_autocast": (2, 6, 64, 19, False),
    "no_budget": (2, 6, 64, None, False),
    "wan_heads": (1, 12, 128, None, False),
}


def main(name: str) -> None:
    batch, heads, head_dim, budget, autocast = VARIANTS[name]
    video = (16, 32, 32)
    q, k, v = video_qkv(batch, heads, heads, video, head_dim, dtype=torch.bfloat16, device="cuda", seed=0,
                        requires_grad=True)
    config = bsa_flex.BSAConfig(query_keep_ratio=0.5, kv_threshold=0.9, block_size=128, max_kv_blocks=budget)
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with context:
            out = bsa_flex.attention(q, k, v, video, config)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    from torch._dynamo.utils import compile_times
    print(f"{name:12s} first call {seconds[0]:7.1f} s  second {seconds[1]:6.3f} s", flush=True)
    print(compile_times(repr="str"), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
