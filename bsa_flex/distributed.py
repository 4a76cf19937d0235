"""Ulysses sequence parallelism for BSA on torch.distributed.

Each of P ranks holds a contiguous shard of the raster token sequence, [B, H, S/P, D]. An
all-to-all trades it for the whole sequence of H/P heads, [B, H/P, S, D]; every rank runs
``bsa_flex.attention`` on its heads (BSA's masks are per head, so no rank needs another's
selection), and a second all-to-all returns the output to sequence shards. Both all-to-alls are
differentiable (their backward is the opposite all-to-all) and are torch's functional
collectives, which torch.compile can trace.

    torchrun --nproc-per-node 2 examples/ulysses.py
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from einops import rearrange
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from ._checks import check_text_tokens, check_video_shape
from .attention import attention
from .config import BSAConfig
from .stats import BSAStats

__all__ = ["ulysses_attention", "check_ulysses_shapes"]


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange equal chunks of dim 0 between the ranks of ``group`` (autograd-aware).

    The explicit wait makes the eager result an ordinary tensor (never an un-awaited async
    one); under torch.compile it is a graph node the scheduler may still overlap.
    """
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, group))


def sequence_to_heads(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """[B, H, S/P, D] sequence shard -> [B, H/P, S, D]: this rank's heads over the whole sequence."""
    chunks = rearrange(x, "b (p h) s d -> p b h s d", p=world)  # chunk p goes to rank p
    received = _all_to_all(chunks, group)  # chunk p came from rank p: sequence shard p
    return rearrange(received, "p b h s d -> b h (p s) d")


def heads_to_sequence(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """[B, H/P, S, D] -> [B, H, S/P, D]: inverse of :func:`sequence_to_heads`."""
    chunks = rearrange(x, "b h (p s) d -> p b h s d", p=world)  # sequence shard p goes to rank p
    received = _all_to_all(chunks, group)  # chunk p came from rank p: head group p
    return rearrange(received, "p b h s d -> b (p h) s d")


def check_ulysses_shapes(q_heads: int, kv_heads: int, shard_len: int, video_shape, world: int,
                         text_tokens: tuple[int, int] = (0, 0)) -> tuple:
    """Raise a ValueError that says what to change when the heads or the sequence do not split."""
    if isinstance(video_shape, (tuple, list)) and all(isinstance(n, int) and n > 0 for n in video_shape):
        S = math.prod(video_shape) + sum(text_tokens)
        if S % world:
            raise ValueError(f"the sequence of {S} tokens (video_shape {tuple(video_shape)}, text {text_tokens}) "
                             f"does not split evenly over {world} ranks: use a number of ranks that divides {S}, "
                             f"or pad the sequence")
        if shard_len * world != S:
            raise ValueError(f"each rank must hold S/P = {S}/{world} = {S // world} tokens (a contiguous "
                             f"shard of the sequence), got {shard_len}")
    video_shape = check_video_shape(video_shape, shard_len * world, text_tokens)
    for name, heads in (("q", q_heads), ("k and v", kv_heads)):
        if heads % world:
            raise ValueError(f"{name} have {heads} heads, which do not split over {world} ranks: use a number of "
                             f"ranks that divides {heads} (Ulysses gives each rank whole heads)")
    return video_shape


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_shape,
                      config: BSAConfig | None = None, *, group=None, scale: float | None = None,
                      enable_gqa: bool = False, score_mod: Callable | None = None, prefix_tokens: int = 0,
                      suffix_tokens: int = 0, return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, BSAStats]:
    """BSA over a sequence sharded across the ranks of ``group`` (default: the world).

    q: [B, Hq, S/P, D], k and v: [B, Hkv, S/P, D] on each rank: rank r holds raster tokens
    r*S/P .. (r+1)*S/P - 1 of the video ``video_shape`` (T, H, W). Hq and Hkv must divide by P.
    Returns this rank's output shard [B, Hq, S/P, D]; with ``return_stats``, also the stats of
    this rank's heads (heads r*Hq/P .. (r+1)*Hq/P - 1). A score_mod sees local head indices.
    ``prefix_tokens``/``suffix_tokens``: non-video tokens around the video in the sharded
    sequence, as in :func:`bsa_flex.attention` (S counts them too).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ulysses_attention needs torch.distributed initialised (dist.init_process_group)")
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, S/P, D] tensor shard")
    text = check_text_tokens(prefix_tokens, suffix_tokens)
    video_shape = check_ulysses_shapes(q.shape[1], k.shape[1], q.shape[2], video_shape, world, text)
    q_heads, k_heads, v_heads = (sequence_to_heads(t, world, group) for t in (q, k, v))
    result = attention(q_heads, k_heads, v_heads, video_shape, config, scale=scale, enable_gqa=enable_gqa,
                       score_mod=score_mod, prefix_tokens=text[0], suffix_tokens=text[1],
                       return_stats=return_stats)
    out, stats = result if return_stats else (result, None)
    out = heads_to_sequence(out, world, group)
    return (out, stats) if return_stats else out
