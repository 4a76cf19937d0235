"""Flex kernel_options sweep at Wan2.1 shapes on a BSA-like mask (keep 0.5, KV density 0.10).

Prints fwd and fwd+bwd medians per option set; invalid sets print their error. A probe.
"""
import sys

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from triton.testing import do_bench

torch.manual_seed(0)
H, D, BS = 12, 128, 128
S = int(sys.argv[1]) if len(sys.argv) > 1 else 153600
density = float(sys.argv[2]) if len(sys.argv) > 2 else 0.10
Sq = S // 2 // BS * BS
nq, nkv = Sq // BS, S // BS
kk = max(1, round(density * nkv))
g = torch.rand(1, H, nq, nkv, device="cuda")
blk = torch.zeros(1, H, nq, nkv, dtype=torch.bool, device="cuda").scatter_(-1, g.topk(kk, -1).indices, True)
bi = blk.to(torch.int32)
cnt = bi.sum(-1, dtype=torch.int32)
idx = torch.argsort(bi, dim=-1, descending=True, stable=True).to(torch.int32)
bm = BlockMask.from_kv_blocks(torch.zeros_like(cnt), torch.zeros_like(idx), cnt, idx, BLOCK_SIZE=BS,
                              seq_lengths=(Sq, S))
q = torch.randn(1, H, Sq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
go = torch.randn_like(q)
OPTIONS = {
    "default": None,
    "f128x64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "f128x128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "f64x128_w4_s3": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "b64_128_128_64_w8": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64, bwd_num_warps=8),
    "b32_128_128_32_w4": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32, bwd_num_warps=4),
}
print(torch.cuda.get_device_name(), torch.__version__, f"S={S} Sq={Sq} KV density {kk / nkv:.3f}", flush=True)
for name, opts in OPTIONS.items():
    try:
        fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, kernel_options=opts), dynamic=False)
        fwd = do_bench(lambda: fn(q, k, v), warmup=20, rep=80, return_mode="median")
        fb = do_bench(lambda: fn(q, k, v).backward(go), warmup=20, rep=80, return_mode="median")
        print(f"{name:>22}: fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms", flush=True)
    except Exception as e:  # report and go on: an invalid option set is a result too
        print(f"{name:>22}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
    torch._dynamo.reset()
