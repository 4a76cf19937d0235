"""BSA on a video-shaped tensor on the CPU: sparsity, time, and error against full attention.

    python examples/quickstart.py
"""
import time

import torch.nn.functional as F

import bsa_flex
from bsa_flex.synthetic import video_qkv


def timed(fn, repeats=3):
    """Best wall-clock time of a few calls (CPU work is synchronous)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main():
    video_shape = (8, 32, 32)  # T, H, W latent tokens: 8,192 tokens
    q, k, v = video_qkv(1, 4, 4, video_shape, 64, seed=0, sharpness=2.0, noise=0.1)  # [B, H, S, D]
    config = bsa_flex.BSAConfig(query_keep_ratio=0.5, kv_threshold=0.9)

    start = time.perf_counter()
    bsa_flex.attention(q, k, v, video_shape, config)  # first call compiles (FlexAttention on CPU)
    compile_s = time.perf_counter() - start
    (out, stats), bsa_s = timed(lambda: bsa_flex.attention(q, k, v, video_shape, config, return_stats=True))
    full, full_s = timed(lambda: F.scaled_dot_product_attention(q, k, v))

    rel_error = float((out - full).norm() / full.norm())
    print(f"video {video_shape} = {q.shape[2]} tokens, {q.shape[1]} heads, head dim {q.shape[3]}, {config}")
    print(f"path: {stats.path}; first call (compile) {compile_s:.1f} s")
    print(f"sparsity {float(stats.sparsity):.3f} (kept queries {float(stats.kept_query_fraction):.2f}, "
          f"KV block density {float(stats.kv_density.mean()):.3f})")
    print(f"time: BSA {bsa_s * 1e3:.1f} ms, full attention (SDPA) {full_s * 1e3:.1f} ms "
          f"(CPU; the speed-ups BSA is built for are on the GPU)")
    print(f"relative L2 error of BSA against full attention: {rel_error:.3f} (an approximation error on "
          f"synthetic smooth-field q/k/v; what matters is the error on a trained model's activations)")


if __name__ == "__main__":
    main()
