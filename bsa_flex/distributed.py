"""Ulysses sequence parallelism for BSA on torch.distributed.

Each of P ranks holds a contiguous shard of the raster token sequence, [B, H, S/P, D]. An
all-to-all trades it for the whole sequence of H/P heads, [B, H/P, S, D]; every rank runs BSA
on its heads (BSA's masks are per head, so no rank needs another's selection), and a second
all-to-all returns the output to sequence shards. Both all-to-alls are differentiable (their
backward is the opposite all-to-all) and are torch's functional collectives, which
torch.compile can trace. BSA's compiled graph takes the received parts as they arrive and
returns the output parts ready to send: the layout changes around the exchanges fuse into its
own gathers instead of running as copies.

    torchrun --nproc-per-node 2 examples/ulysses.py
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from einops import rearrange
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from .attention import sparse_attention
from .config import BSAConfig
from .runtime import make_plan, run_operator
from .stats import BSAStats, concat_heads
from .validation import check_operands, check_text_tokens, check_video_shape, is_integer

__all__ = ["ulysses_attention", "check_ulysses_shapes"]


def _issue_all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Start exchanging equal chunks of dim 0 between the ranks of ``group`` (autograd-aware).

    Returns before the exchange completes; pass the result through ``wait_tensor`` where it is
    used. NCCL starts a collective only after the work already queued on the current stream, so
    an exchange can overlap only the computations queued after it was issued.
    """
    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def _heads_by_rank(x: torch.Tensor, world: int, chunks: int) -> list[torch.Tensor]:
    """[B, H, S/P, D] -> per head chunk c, [P, B, H/(P*chunks), S/P, D]: part p goes to rank p."""
    return list(rearrange(x, "b (p c h) s d -> c p b h s d", p=world, c=chunks))


def _sequence_from_ranks(received: torch.Tensor) -> torch.Tensor:
    """[P, B, h, S/P, D] received from each rank -> [B, h, S, D]: whole sequence of this rank's heads."""
    return rearrange(received, "p b h s d -> b h (p s) d")


def _sequence_by_rank(x: torch.Tensor, world: int) -> torch.Tensor:
    """[B, h, S, D] -> [P, B, h, S/P, D]: sequence shard p goes to rank p."""
    return rearrange(x, "b h (p s) d -> p b h s d", p=world)


def _heads_from_ranks(received: list[torch.Tensor]) -> torch.Tensor:
    """Per head chunk, [P, B, h, S/P, D] from each rank -> [B, H, S/P, D] in the caller's head order."""
    chunks = [wait_tensor(r) for r in received]
    # stack copies even a single tensor; one chunk with B == 1 is a view
    stacked = chunks[0][None] if len(chunks) == 1 else torch.stack(chunks)
    return rearrange(stacked, "c p b h s d -> b (p c h) s d")


def _sparse_attention_on_received(q_parts: torch.Tensor, k_parts: torch.Tensor, v_parts: torch.Tensor,
                                  threshold: torch.Tensor, plan):
    """:func:`sparse_attention` on the received parts [P, B, h, S/P, D]; the output as parts to send back.

    Run as BSA's one graph, the sequence's reassembly fuses into the operator's gathers and the
    output's split into the gather that fills pruned queries. Returns (out parts, lse, Selection).
    """
    q, k, v = (_sequence_from_ranks(t) for t in (q_parts, k_parts, v_parts))
    out, lse, selection = sparse_attention(q, k, v, threshold, plan)
    return _sequence_by_rank(out, q_parts.shape[0]).contiguous(), lse, selection


def sequence_to_heads(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """[B, H, S/P, D] sequence shard -> [B, H/P, S, D]: this rank's heads over the whole sequence."""
    (part,) = _heads_by_rank(x, world, 1)
    return _sequence_from_ranks(wait_tensor(_issue_all_to_all(part, group)))


def heads_to_sequence(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """[B, H/P, S, D] -> [B, H, S/P, D]: inverse of :func:`sequence_to_heads`."""
    return _heads_from_ranks([_issue_all_to_all(_sequence_by_rank(x, world), group)])


def check_ulysses_shapes(q_heads: int, kv_heads: int, shard_len: int, video_shape, world: int,
                         text_tokens: tuple[int, int] = (0, 0)) -> tuple:
    """Raise a ValueError that says what to change when the heads or the sequence do not split."""
    if isinstance(video_shape, (tuple, list)) and all(is_integer(n) and n > 0 for n in video_shape):
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
                      suffix_tokens: int = 0, head_chunks: int = 1,
                      return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, BSAStats]:
    """BSA over a sequence sharded across the ranks of ``group`` (default: the world).

    q: [B, Hq, S/P, D], k and v: [B, Hkv, S/P, D] on each rank: rank r holds raster tokens
    r*S/P .. (r+1)*S/P - 1 of the video ``video_shape`` (T, H, W). Hq and Hkv must divide by P.
    Returns this rank's output shard [B, Hq, S/P, D]; with ``return_stats``, also the stats of
    this rank's heads (heads r*Hq/P .. (r+1)*Hq/P - 1). A score_mod sees this rank's head indices.
    ``prefix_tokens``/``suffix_tokens``: non-video tokens around the video in the sharded
    sequence, as in :func:`bsa_flex.attention` (S counts them too).
    ``head_chunks``: split this rank's heads into that many groups attended one after another,
    so that one group's all-to-alls travel while another attends (both head counts per rank must
    divide by it); the result is the same for every value, the speed not (docs/distributed.md).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ulysses_attention needs torch.distributed initialised (dist.init_process_group)")
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    config = BSAConfig() if config is None else config
    check_operands(q, k, v, config, scale=scale, enable_gqa=enable_gqa, score_mod=score_mod)
    text = check_text_tokens(prefix_tokens, suffix_tokens)
    video_shape = check_ulysses_shapes(q.shape[1], k.shape[1], q.shape[2], video_shape, world, text)
    _check_head_chunks(head_chunks, q.shape[1] // world, k.shape[1] // world)
    # every input exchange is issued before any attention is queued: see _issue_all_to_all
    pending = [[_issue_all_to_all(part, group) for part in _heads_by_rank(t, world, head_chunks)]
               for t in (q, k, v)]
    outputs, chunk_stats = [], []
    for chunk in range(head_chunks):
        q_c, k_c, v_c = (wait_tensor(parts[chunk]) for parts in pending)
        plan = make_plan(q_c, k_c, v_c, video_shape, config, scale=scale, text_tokens=text,
                         score_mod=_offset_heads(score_mod, chunk * q_c.shape[2]))
        result = run_operator(_sparse_attention_on_received, q_c, k_c, v_c, plan, return_stats)
        out_parts, stats = result if return_stats else (result, None)
        outputs.append(_issue_all_to_all(out_parts, group))
        chunk_stats.append(stats)
    out = _heads_from_ranks(outputs)
    return (out, concat_heads(chunk_stats)) if return_stats else out


def _check_head_chunks(head_chunks, q_heads_per_rank: int, kv_heads_per_rank: int) -> None:
    if not is_integer(head_chunks) or head_chunks < 1:
        raise ValueError(f"head_chunks must be an int >= 1, got {head_chunks!r}")
    if q_heads_per_rank % head_chunks or kv_heads_per_rank % head_chunks:
        raise ValueError(f"head_chunks={head_chunks} must divide the heads each rank attends "
                         f"({q_heads_per_rank} q heads, {kv_heads_per_rank} k/v heads): use a divisor of both")


def _offset_heads(score_mod: Callable | None, offset: int) -> Callable | None:
    """``score_mod`` seen from a head chunk: its head indices shifted to this rank's numbering."""
    if score_mod is None or offset == 0:
        return score_mod

    def shifted(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h + offset, q_idx, kv_idx)
    return shifted
