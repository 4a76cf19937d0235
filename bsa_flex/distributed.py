"""Ulysses sequence parallelism for BSA on torch.distributed.

Each of P ranks holds a contiguous shard of the raster token sequence, [B, H, S/P, D]. An
all-to-all trades it for the whole sequence of H/P heads, [B, H/P, S, D]; every rank runs BSA
on its heads (BSA's masks are per head, so no rank needs another's selection), and a second
all-to-all returns the output to sequence shards. Both all-to-alls are differentiable (their
backward is the opposite all-to-all) and are torch's functional collectives, which
torch.compile can trace. BSA's compiled graph takes the received parts as they arrive and
returns the output parts ready to send: the layout changes around the exchanges fuse into its
own gathers instead of running as copies.

Head counts that P does not divide (12 heads over 8 ranks): the ranks form G = gcd(Hq, Hkv, P)
head groups of R = P/G ranks. Every rank of a group receives the whole sequence of the group's
Hq/G heads; the R ranks of a group compute the same selection and each attends one of R runs of
the compact query blocks (a query block's KV selection is its own, so no softmax merge is
needed; the other blocks attend nothing and give exact zeros), and the owner of a sequence
shard sums the R outputs of each group, of which one is non-zero per token.

    torchrun --nproc-per-node 2 examples/ulysses.py
"""
from __future__ import annotations

import dataclasses
import functools
import logging
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

__all__ = ["ulysses_attention", "check_ulysses_shapes", "head_groups", "rank_attention", "sequence_to_heads",
           "heads_to_sequence"]

log = logging.getLogger("bsa_flex")


def _issue_all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Start exchanging equal chunks of dim 0 between the ranks of ``group`` (autograd-aware).

    Returns before the exchange completes; pass the result through ``wait_tensor`` where it is
    used. NCCL starts a collective only after the work already queued on the current stream, so
    an exchange can overlap only the computations queued after it was issued.
    """
    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def _heads_by_rank(x: torch.Tensor, world: int, chunks: int, replicas: int = 1) -> list[torch.Tensor]:
    """[B, H, S/P, D] -> per head chunk c, [P, B, H/(G*chunks), S/P, D]: part p goes to rank p.

    G = P / replicas head groups; rank p is in group p // replicas, and the ranks of a group
    receive the same heads."""
    parts = rearrange(x, "b (g c h) s d -> c g b h s d", g=world // replicas, c=chunks)
    return list(parts.repeat_interleave(replicas, 1) if replicas > 1 else parts)


def _sequence_from_ranks(received: torch.Tensor) -> torch.Tensor:
    """[P, B, h, S/P, D] received from each rank -> [B, h, S, D]: whole sequence of this rank's heads."""
    return rearrange(received, "p b h s d -> b h (p s) d")


def _sequence_by_rank(x: torch.Tensor, world: int) -> torch.Tensor:
    """[B, h, S, D] -> [P, B, h, S/P, D]: sequence shard p goes to rank p."""
    return rearrange(x, "b h (p s) d -> p b h s d", p=world)


def _heads_from_ranks(received: list[torch.Tensor], replicas: int = 1) -> torch.Tensor:
    """Per head chunk, [P, B, h, S/P, D] from each rank -> [B, H, S/P, D] in the caller's head order;
    the ``replicas`` parts of a head group (each zero where another rank attended) summed."""
    chunks = [wait_tensor(r) for r in received]
    # stack copies even a single tensor; one chunk with B == 1 is a view
    stacked = chunks[0][None] if len(chunks) == 1 else torch.stack(chunks)
    if replicas > 1:
        stacked = rearrange(stacked, "c (g r) b h s d -> r c g b h s d", r=replicas).sum(0)
    return rearrange(stacked, "c p b h s d -> b (p c h) s d")


def head_groups(q_heads: int, kv_heads: int, world: int) -> tuple[int, int]:
    """(G head groups, R ranks per group): the most groups that split the q and k/v heads and the ranks."""
    groups = math.gcd(math.gcd(q_heads, kv_heads), world)
    return groups, world // groups


def _sparse_attention_on_received(q_parts: torch.Tensor, k_parts: torch.Tensor, v_parts: torch.Tensor,
                                  threshold: torch.Tensor, plan):
    """:func:`sparse_attention` on the received parts [P, B, h, S/P, D]; the output as parts to send back.

    Run as BSA's one graph, the sequence's reassembly fuses into the operator's gathers and the
    output's split into the gather that fills pruned queries. Returns (out parts, lse, Selection).
    """
    q, k, v = (_sequence_from_ranks(t) for t in (q_parts, k_parts, v_parts))
    out, lse, selection = sparse_attention(q, k, v, threshold, plan)
    return _sequence_by_rank(out, q_parts.shape[0]).contiguous(), lse, selection


def sequence_to_heads(x: torch.Tensor, world: int, group, replicas: int = 1) -> torch.Tensor:
    """[B, H, S/P, D] sequence shard -> [B, H/G, S, D]: this rank's heads over the whole sequence
    (G = P / replicas head groups, :func:`head_groups`)."""
    (part,) = _heads_by_rank(x, world, 1, replicas)
    return _sequence_from_ranks(wait_tensor(_issue_all_to_all(part, group)))


def heads_to_sequence(x: torch.Tensor, world: int, group, replicas: int = 1) -> torch.Tensor:
    """[B, H/G, S, D] -> [B, H, S/P, D]: inverse of :func:`sequence_to_heads` (a head group's replicas summed)."""
    return _heads_from_ranks([_issue_all_to_all(_sequence_by_rank(x, world), group)], replicas)


def rank_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_shape, config: BSAConfig, *,
                   query_share: tuple[int, int] = (0, 1), enable_gqa: bool = False) -> torch.Tensor:
    """What one rank attends between the exchanges: BSA over its heads' whole sequence [B, h, S, D],
    only the ``query_share`` (i, n) run of query blocks (output 0 elsewhere); for timing a rank alone."""
    check_operands(q, k, v, config, scale=None, enable_gqa=enable_gqa, score_mod=None)
    video_shape = check_video_shape(video_shape, q.shape[2], (0, 0))
    if (not isinstance(query_share, (tuple, list)) or len(query_share) != 2 or not all(map(is_integer, query_share))
            or not 0 <= query_share[0] < query_share[1]):
        raise ValueError(f"query_share must be (i, n) with integers 0 <= i < n, got {query_share!r}")
    plan = dataclasses.replace(make_plan(q, k, v, video_shape, config), query_share=tuple(query_share))
    return run_operator(sparse_attention, q, k, v, plan, False)


def check_ulysses_shapes(q_heads: int, kv_heads: int, shard_len: int, video_shape, world: int,
                         text_tokens: tuple[int, int] = (0, 0)) -> tuple:
    """Raise a ValueError that says what to change when the sequence does not split over the ranks
    (any head count works: see :func:`head_groups`)."""
    if isinstance(video_shape, (tuple, list)) and all(is_integer(n) and n > 0 for n in video_shape):
        S = math.prod(video_shape) + sum(text_tokens)
        if S % world:
            raise ValueError(f"the sequence of {S} tokens (video_shape {tuple(video_shape)}, text {text_tokens}) "
                             f"does not split evenly over {world} ranks: use a number of ranks that divides {S}, "
                             f"or pad the sequence")
        if shard_len * world != S:
            raise ValueError(f"each rank must hold S/P = {S}/{world} = {S // world} tokens (a contiguous "
                             f"shard of the sequence), got {shard_len}")
    return check_video_shape(video_shape, shard_len * world, text_tokens)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_shape,
                      config: BSAConfig | None = None, *, group=None, scale: float | None = None,
                      enable_gqa: bool = False, score_mod: Callable | None = None, prefix_tokens: int = 0,
                      suffix_tokens: int = 0, head_chunks: int = 1,
                      return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, BSAStats]:
    """BSA over a sequence sharded across the ranks of ``group`` (default: the world).

    q: [B, Hq, S/P, D], k and v: [B, Hkv, S/P, D] on each rank: rank r holds raster tokens
    r*S/P .. (r+1)*S/P - 1 of the video ``video_shape`` (T, H, W). Where P divides Hq and Hkv,
    each rank attends Hq/P whole heads; otherwise ranks share heads (module docstring, logged).
    Returns this rank's output shard [B, Hq, S/P, D]; with ``return_stats``, also the stats of
    its heads (those of its group, :func:`head_groups`; sharing, of its own query blocks only).
    A score_mod sees this rank's head indices.
    ``prefix_tokens``/``suffix_tokens``: non-video tokens around the video in the sharded
    sequence, as in :func:`bsa_flex.attention` (S counts them too).
    ``head_chunks``: this rank's heads in that many chunks attended in turn, so that one chunk's
    all-to-alls travel while another attends; the same result, another speed (docs/distributed.md).
    """
    group = _initialised_group(group)
    world = dist.get_world_size(group)
    config = BSAConfig() if config is None else config
    check_operands(q, k, v, config, scale=scale, enable_gqa=enable_gqa, score_mod=score_mod)
    text = check_text_tokens(prefix_tokens, suffix_tokens)
    video_shape = check_ulysses_shapes(q.shape[1], k.shape[1], q.shape[2], video_shape, world, text)
    replicas, share = _rank_share(q.shape[1], k.shape[1], group, head_chunks)
    # every input exchange is issued before any attention is queued: see _issue_all_to_all
    pending = [[_issue_all_to_all(part, group) for part in _heads_by_rank(t, world, head_chunks, replicas)]
               for t in (q, k, v)]
    outputs, chunk_stats = [], []
    for chunk in range(head_chunks):
        q_c, k_c, v_c = (wait_tensor(parts[chunk]) for parts in pending)
        plan = dataclasses.replace(make_plan(q_c, k_c, v_c, video_shape, config, scale=scale, text_tokens=text,
                                             score_mod=_offset_heads(score_mod, chunk * q_c.shape[2])),
                                   query_share=share)
        out_parts, stats = _with_stats(run_operator(_sparse_attention_on_received, q_c, k_c, v_c, plan,
                                                    return_stats), return_stats)
        outputs.append(_issue_all_to_all(out_parts, group))
        chunk_stats.append(stats)
    out = _heads_from_ranks(outputs, replicas)
    return (out, concat_heads(chunk_stats)) if return_stats else out


def _initialised_group(group):
    """``group``, or the world; a RuntimeError without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ulysses_attention needs torch.distributed initialised (dist.init_process_group)")
    return group if group is not None else dist.group.WORLD


def _rank_share(q_heads: int, kv_heads: int, group, head_chunks: int) -> tuple[int, tuple[int, int]]:
    """(R ranks per head group, this rank's query share (i, R)); head_chunks checked, sharing logged."""
    world = dist.get_world_size(group)
    groups, replicas = head_groups(q_heads, kv_heads, world)
    _check_head_chunks(head_chunks, q_heads // groups, kv_heads // groups)
    if replicas > 1:
        _announce_shared_heads(q_heads, kv_heads, world, groups)
    return replicas, (dist.get_rank(group) % replicas, replicas)


def _with_stats(result, return_stats: bool) -> tuple:
    """(output, stats or None) of a ``run_operator`` result."""
    return result if return_stats else (result, None)


@torch.compiler.assume_constant_result
def _announce_shared_heads(q_heads: int, kv_heads: int, world: int, groups: int) -> bool:
    """Log (once per shape) that the ranks share heads, and what it costs."""
    return _announce_shared_heads_once(q_heads, kv_heads, world, groups)


@functools.cache
def _announce_shared_heads_once(q_heads: int, kv_heads: int, world: int, groups: int) -> bool:
    log.info("bsa_flex: %d q / %d k/v heads over %d ranks: %d head groups of %d ranks; each rank receives "
             "%d heads' whole sequence and attends 1/%d of their query blocks (the selection is computed "
             "on every rank of a group)", q_heads, kv_heads, world, groups, world // groups,
             q_heads // groups, world // groups)
    return True


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
