"""The smallest complete use of bsa_flex: sparse attention over a video's tokens, what it skipped,
and how far it lands from full attention.

    python examples/quickstart.py            (CPU, about a minute: the first call compiles)
    python examples/quickstart.py cuda       (a GPU; FlashAttention-4 where installed, else Triton)

For timings, `bsa-flex demo`; for the benchmark, `python -m bsa_flex.bench`.
"""
import sys

import torch
import torch.nn.functional as F

import bsa_flex
from bsa_flex.synthetic import video_qkv

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
video_shape = (8, 32, 32)  # T, H, W latent tokens after patchify: 8,192 tokens
q, k, v = video_qkv(1, 4, 4, video_shape, 64, dtype=dtype, device=device, seed=0, sharpness=2.0, noise=0.1)

config = bsa_flex.BSAConfig(query_keep_ratio=0.5, kv_threshold=0.9)  # q, k, v: [B, H, S, D]
out, stats = bsa_flex.attention(q, k, v, video_shape, config, return_stats=True)
full = F.scaled_dot_product_attention(q, k, v)

print(f"{q.shape[2]:,} tokens, {q.shape[1]} heads x {q.shape[3]} on {device}, kernel {stats.kernel}")
print(f"sparsity {float(stats.sparsity):.3f}: kept queries {float(stats.kept_query_fraction):.2f}, "
      f"KV block density {float(stats.kv_density.mean()):.3f}")
print(f"relative L2 distance to full attention: {float((out - full).float().norm() / full.float().norm()):.3f} "
      f"(synthetic q/k/v; measure it on your model's)")
