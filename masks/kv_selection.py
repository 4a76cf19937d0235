"""KV sparsity: block scores between pooled query blocks and pooled key blocks, then a
statistical dynamic threshold per (batch, head, query block)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .layout import TileLayout
from .ordering import stable_argsort

__all__ = ["KV_RULES", "ZSCORE_RANGE", "pool_blocks", "kv_block_probs", "own_kv_blocks", "select_kv_blocks",
           "extra_kv_blocks", "valid_threshold"]

KV_RULES = ("cumulative", "zscore")


def pool_blocks(x: torch.Tensor, valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of the real rows of each block: x [B, H, N, D], valid [..., N] -> [B, H, N/block, D] float32.

    Rows that are not real are excluded by selection, not by a zero weight, so that whatever
    they hold cannot leak into the mean; NaN and infinite entries of real rows count as 0 (a head
    holding them still gets a well-formed selection; its output is NaN anyway).
    """
    valid = valid.expand(x.shape[:-1])
    real = torch.where(valid[..., None], x.detach().float().nan_to_num(0.0, 0.0, 0.0), 0.0)
    total = rearrange(real, "b h (n s) d -> b h n s d", s=block_size).sum(-2)
    count = rearrange(valid, "b h (n s) -> b h n s", s=block_size).sum(-1, keepdim=True)
    return total / count.clamp_min(1)


def kv_block_probs(pooled_q: torch.Tensor, pooled_k: torch.Tensor, kv_block_valid: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Float32 softmax over KV blocks of pooled scores: [B, Hq, nq, D] x [B, Hkv, nkv, D] -> [B, Hq, nq, nkv].

    Query heads are grouped onto key heads as in GQA (Hq a multiple of Hkv); KV blocks without a
    real token get probability 0.
    """
    group = pooled_q.shape[1] // pooled_k.shape[1]
    pq = rearrange(pooled_q, "b (h g) n d -> b h g n d", g=group)
    scores = torch.einsum("bhgnd,bhmd->bhgnm", pq, pooled_k) * scale
    scores = rearrange(scores, "b h g n m -> b (h g) n m")
    return scores.masked_fill(~kv_block_valid, float("-inf")).softmax(-1)


def own_kv_blocks(layout: TileLayout, keep_per_window: int, num_q_blocks: int) -> torch.Tensor:
    """[nq, nkv] bool: the KV blocks overlapping the tiles whose kept queries fill each query block."""
    kept_per_tile = layout.windows_per_tile * keep_per_window
    bs, tile_tokens = layout.block_size, layout.tile_tokens
    device = layout.slot_valid.device
    q_block = torch.arange(num_q_blocks, device=device)
    first_tile = q_block * bs // kept_per_tile
    last_tile = (((q_block + 1) * bs - 1) // kept_per_tile).clamp_max(layout.num_tiles - 1)
    lo = first_tile * tile_tokens // bs
    hi = ((last_tile + 1) * tile_tokens - 1) // bs
    kv_block = torch.arange(layout.num_kv_blocks, device=device)
    own = (kv_block >= lo[:, None]) & (kv_block <= hi[:, None])
    return own & layout.kv_block_valid


# The rules' valid ranges; a threshold tensor outside them acts as the nearest valid value, NaN as
# the densest (a bad value never makes attention sparser than asked).
ZSCORE_RANGE = (-1e6, 1e6)


def valid_threshold(threshold: torch.Tensor, rule: str) -> torch.Tensor:
    """The KV rule's number moved into its valid range: p into (0, 1], z into ZSCORE_RANGE; NaN densest."""
    if rule == "cumulative":
        return torch.where(threshold.isnan(), 1.0, threshold.clamp(torch.finfo(torch.float32).tiny, 1.0))
    return torch.where(threshold.isnan(), ZSCORE_RANGE[0], threshold.clamp(*ZSCORE_RANGE))


def _keep_sorted_by_rule(sorted_probs: torch.Tensor, sorted_valid: torch.Tensor,
                         threshold: torch.Tensor, rule: str) -> torch.Tensor:
    """Which blocks, in descending-probability order, the statistical threshold keeps.

    cumulative: the fewest blocks whose mass reaches p (a block is kept while the mass before
    it is below p; p >= 1 keeps every block). zscore: blocks with probability at least
    mean + z * std over the real blocks.
    """
    if rule == "cumulative":
        mass_before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))
        return (mass_before < threshold) | (threshold >= 1.0)
    n_valid = sorted_valid.sum(-1, keepdim=True).clamp_min(1)
    mean = 1.0 / n_valid
    var = ((sorted_probs - mean).square() * sorted_valid).sum(-1, keepdim=True) / n_valid
    return sorted_probs >= mean + threshold * var.sqrt()


def select_kv_blocks(probs: torch.Tensor, own: torch.Tensor | None, kv_block_valid: torch.Tensor,
                     threshold: torch.Tensor, rule: str, *, min_blocks: int,
                     max_blocks: int | None) -> torch.Tensor:
    """The boolean block matrix [B, Hq, nq, nkv] of KV blocks each query block attends to.

    The threshold rule decides, capped at ``max_blocks``; the ``min_blocks`` most probable
    blocks and the ``own`` blocks ([nq, nkv] bool, e.g. the query block's own tiles; None for
    none) are always kept; blocks without a real token never.
    Ties in probability resolve by block index (stable sort), so the result is reproducible.
    Every rule is applied in descending-probability order, then scattered back once.
    """
    order = stable_argsort(probs, descending=True)
    keep_sorted = _keep_sorted_by_rule(probs.gather(-1, order), kv_block_valid[order],
                                       valid_threshold(threshold, rule), rule)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    if max_blocks is not None:
        keep_sorted = keep_sorted & (rank < max_blocks)
    keep_sorted = keep_sorted | (rank < min_blocks)
    if own is not None:
        keep_sorted = keep_sorted | own.expand_as(probs).gather(-1, order)
    keep_sorted = keep_sorted & kv_block_valid[order]
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def extra_kv_blocks(pooled_q: torch.Tensor, pooled_k: torch.Tensor, own: torch.Tensor, kv_block_video: torch.Tensor,
                    count: int, scale: float) -> torch.Tensor:
    """[B, Hq, nq, nkv] bool: per query block, the ``count`` most probable video KV blocks outside ``own``.

    pooled_q [B, Hq, nq, D], pooled_k [B, Hkv, nkv, D], own [B, Hq, nq, nkv] bool (blocks it attends anyway),
    kv_block_video [nkv] bool. The KV rule's pooled scores rank the blocks (ties to the lower block index); no
    threshold, only the count.
    """
    probs = kv_block_probs(pooled_q, pooled_k, kv_block_video, scale).masked_fill(own, -1.0)  # own ones last
    every_block = torch.ones((), device=probs.device)  # the cumulative rule at p = 1 keeps all: the cap decides
    return select_kv_blocks(probs, None, kv_block_video, every_block, "cumulative", min_blocks=0,
                            max_blocks=count) & ~own
