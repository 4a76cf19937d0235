"""Video-like q, k, v: smooth space-time fields plus noise, so that BSA's selections matter.

On i.i.d. random q/k every block looks alike and a cumulative-mass threshold keeps almost
everything; real video tokens are locally redundant and attend mostly to a few regions.
"""
from __future__ import annotations

import math

import torch

__all__ = ["video_qkv"]


def _smooth_field(video_shape, channels: int, waves: int, frequency: float, generator: torch.Generator) -> torch.Tensor:
    """[S, channels] sum of random low-frequency plane waves over (t, h, w), unit variance."""
    axes = [torch.arange(n, dtype=torch.float64) / max(n, 1) for n in video_shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # [S, 3]
    freq = torch.randn(waves, 3, generator=generator, dtype=torch.float64) * frequency
    phase = torch.rand(waves, generator=generator, dtype=torch.float64) * 2 * math.pi
    basis = torch.cos(2 * math.pi * coords @ freq.T + phase)  # [S, waves]
    mix = torch.randn(waves, channels, generator=generator, dtype=torch.float64) / math.sqrt(waves)
    return basis @ mix * math.sqrt(2.0)


def video_qkv(batch: int, q_heads: int, kv_heads: int, video_shape, head_dim: int, *,
              dtype=torch.float32, device="cpu", seed: int = 0, noise: float = 0.3,
              sharpness: float = 4.0, frequency: float = 1.0, requires_grad: bool = False):
    """q [B, Hq, S, D], k and v [B, Hkv, S, D] shaped like a video DiT's attention inputs.

    Each head projects a smooth field of the video coordinates; ``noise`` adds i.i.d. noise,
    ``sharpness`` scales q and k so that attention concentrates (larger: sparser attention);
    ``frequency`` sets how fast the fields vary across the video (smaller: smoother tiles).
    Deterministic in ``seed`` on a given device type: the smooth fields and projections come
    from a CPU generator (small), the noise (S x D per head, the bulk) from a generator on
    ``device``, so that 153K-token inputs take a fraction of a second on a GPU.
    """
    g = torch.Generator().manual_seed(seed)
    noise_g = torch.Generator(device=device).manual_seed(seed + 1)
    S = math.prod(video_shape)

    def heads(n: int, scale: float) -> torch.Tensor:
        out = torch.empty(batch, n, S, head_dim, dtype=torch.float32, device=device)
        for b in range(batch):
            field = _smooth_field(video_shape, 16, 12, frequency, g).float().to(device)  # shared by the heads
            for h in range(n):
                proj = (torch.randn(16, head_dim, generator=g, dtype=torch.float64) / 4.0).float().to(device)
                out[b, h] = field @ proj + noise * torch.randn(S, head_dim, generator=noise_g, device=device)
        return (out * scale).to(dtype=dtype).requires_grad_(requires_grad)

    qk_scale = math.sqrt(sharpness)
    return heads(q_heads, qk_scale), heads(kv_heads, qk_scale), heads(kv_heads, 1.0)
