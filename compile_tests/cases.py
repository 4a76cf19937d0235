"""Fixed shapes and configs for the compiled paths (each new one costs a compile)."""
from typing import NamedTuple

import torch

from bsa_flex import BSAConfig
from bsa_flex.synthetic import video_qkv


class Case(NamedTuple):
    video_shape: tuple
    config: BSAConfig
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def gqa(self) -> bool:
        return self.q_heads != self.kv_heads

    def inputs(self, seed, device="cpu", **kwargs):
        return video_qkv(self.batch, self.q_heads, self.kv_heads, self.video_shape, self.head_dim,
                         dtype=self.dtype, device=device, seed=seed, **kwargs)


def relative_position_bias(score, b, h, q_idx, kv_idx):
    """A score_mod over raster positions: distance decay per head plus soft-capping."""
    distance = (q_idx - kv_idx).abs().float()
    return 8.0 * torch.tanh((score - 0.01 * (h + 1) * distance) / 8.0)
