"""``bsa_flex.attention``: Bidirectional Sparse Attention, read top to bottom as in the paper.

The operator is :func:`sparse_attention`, one call into ``masks`` or a kernel per step of the
paper; its constants travel as one :class:`~bsa_flex.plan.BSAPlan`. Compiling, dispatch and
warnings live in :mod:`bsa_flex.runtime`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from masks import (KeptQueries, Selection, compact_queries, extra_kv_blocks, fill_from_kept, kv_block_probs,
                   pool_blocks, select_kv_blocks, select_queries, takes_own_output, to_tile_major, video_query_rows)

from .config import BSAConfig
from .paths import attend_path
from .plan import BSAPlan
from .runtime import BSARecompileWarning, make_plan, run_operator
from .stats import BSAStats
from .validation import check_choice, check_inputs, check_text_tokens

__all__ = ["attention", "select_sparse", "sparse_attention", "SparseOperands", "BSARecompileWarning", "TOKEN_ORDERS"]

TOKEN_ORDERS = ("raster", "tile")


class SparseOperands(NamedTuple):
    """What the attention kernel consumes: compact queries, tile-major keys/values, selections."""

    q_kept: torch.Tensor  # [B, Hq, Nq, D]
    k_slots: torch.Tensor  # [B, Hkv, n_slots, D]
    v_slots: torch.Tensor  # [B, Hkv, n_slots, D]
    kept: KeptQueries
    kv_blocks: torch.Tensor  # [B, Hq, Nq / block, n_slots / block] bool


def select_sparse(q, k, v, threshold: torch.Tensor, plan: BSAPlan) -> SparseOperands:
    """Tile, select queries, select KV blocks: every step of BSA before the attention kernel."""
    layout, config = plan.layout, plan.config
    bs = layout.block_size
    tiled = plan.in_tile_order
    kept = select_queries(q, layout, config.keep_per_window, config.fill, tiled)  # tile, select queries
    q_kept = compact_queries(q, kept, layout, tiled)  # compact queries
    k_slots, v_slots = to_tile_major(k, layout, tiled), to_tile_major(v, layout, tiled)
    video_rows = video_query_rows(layout, config.keep_per_window)  # non-video query rows follow
    pooled_k = pool_blocks(k_slots, layout.slot_valid, bs)
    probs = kv_block_probs(pool_blocks(q_kept[:, :, :video_rows], kept.kept_valid[..., :video_rows], bs),
                           pooled_k, layout.kv_block_video, plan.scale)
    own = plan.static.own_kv_blocks if config.force_own_kv_blocks else None
    kv_blocks = select_kv_blocks(probs, own, layout.kv_block_video, threshold, config.kv_rule,
                                 min_blocks=config.min_kv_blocks,
                                 max_blocks=config.kv_block_cap(layout.text_slot_start // bs))  # select KV blocks
    if layout.text_slot_start < layout.num_slots:  # non-video keys for every query, every key for non-video queries
        text_rows = (layout.num_slots - layout.text_slot_start) // bs
        kv_blocks = torch.cat([kv_blocks | layout.kv_block_text,
                               layout.kv_block_valid.expand(*kv_blocks.shape[:2], text_rows, -1)], 2)
    local = plan.static.local_kv_blocks
    if local.shape[0]:  # fill "local": the pruned queries' rows attend their own tiles' (and the non-video) KV blocks
        local = local.expand(*kv_blocks.shape[:2], -1, -1)
        if config.local_extra_kv_blocks:  # and the most probable others
            first = q_kept.shape[2] - local.shape[2] * bs
            local = local | extra_kv_blocks(pool_blocks(q_kept[:, :, first:], kept.kept_valid[..., first:], bs),
                                            pooled_k, local, layout.kv_block_video, config.local_extra_kv_blocks,
                                            plan.scale)
        kv_blocks = torch.cat([kv_blocks, local], 2)
    if plan.query_share[1] > 1:  # ranks sharing these heads: this one attends its run of query blocks only
        kv_blocks = kv_blocks & query_blocks_in_share(kv_blocks.shape[2], plan.query_share, q.device)[:, None]
    return SparseOperands(q_kept, k_slots, v_slots, kept, kv_blocks)


def query_blocks_in_share(n_blocks: int, share: tuple[int, int], device) -> torch.Tensor:
    """[n_blocks] bool: the query blocks of run ``share[0]`` of ``share[1]`` near-equal consecutive runs."""
    index, runs = share
    block = torch.arange(n_blocks, device=device)
    return (block >= index * n_blocks // runs) & (block < (index + 1) * n_blocks // runs)


def sparse_attention(q, k, v, threshold: torch.Tensor, plan: BSAPlan):
    """The BSA operator on validated inputs: (out [B, Hq, S, D], lse [B, Hq, S] or None, Selection).

    threshold: 0-dim float32 tensor holding the KV rule's number (p or z), a tensor so that
    changing it never recompiles. ``plan.kernel`` picks the attention path (FlexAttention on a
    kernel, or the blockwise CPU autograd path).
    """
    ops = select_sparse(q, k, v, threshold, plan)
    kept = ops.kept
    out_kept, lse_kept = attend_path(plan.kernel)(ops.q_kept, ops.k_slots, ops.v_slots, ops.kv_blocks,
                                                  kept.kept_token, plan)  # attend (block mask built inside)
    fill_source, candidates = fill_in_input_order(kept, plan)
    out = fill_from_kept(out_kept, fill_source, candidates, plan.static.fill_candidate_valid)  # fill, untile
    lse = None if lse_kept is None else lse_kept.gather(2, fill_source)
    if plan.config.fill == "none":  # a pruned query attends to nothing: output 0, its residual passes through
        own = takes_own_output(kept)
        out, lse = zero_where_pruned(out, lse, own[..., plan.layout.tile_order] if plan.in_tile_order else own)
    out, lse = nan_where_non_finite(out, lse, non_finite_heads(q, ops.k_slots, ops.v_slots))
    return out, lse, Selection(kept.kept_token, kept.kept_valid, kept.fill_source, ops.kv_blocks, kept.local_row)


def fill_in_input_order(kept: KeptQueries, plan: BSAPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The fill source of every output row [B, H, S] and the fill's candidate rows [Nq, c], in q's token order."""
    candidates = plan.static.fill_candidates
    if not plan.in_tile_order:
        return kept.fill_source, candidates
    layout = plan.layout
    return kept.fill_source[..., layout.tile_order], layout.tile_position[candidates]


def zero_where_pruned(out: torch.Tensor, lse: torch.Tensor | None, kept: torch.Tensor):
    """Output 0 and LSE -inf (a query with no key) at every token that is not a kept query, kept [B, Hq, S]."""
    out = torch.where(kept[..., None], out, 0.0)
    return out, None if lse is None else torch.where(kept, lse, float("-inf"))


def non_finite_heads(q, k, v) -> torch.Tensor:
    """[B, Hq] bool: the (batch, query head) whose q, or whose key/value head's k or v, holds a NaN or inf.

    k and v may be the tile-major slots (every token is in one, padding slots copy a real token):
    read there, the check can share the pass that writes them.
    """
    def bad(x):  # [B, H]: one reduction over the whole (S, D) plane (NaN propagates through amax), no host sync
        return ~x.detach().flatten(2).abs().amax(-1).isfinite()
    group = q.shape[1] // k.shape[1]
    return bad(q) | (bad(k) | bad(v)).repeat_interleave(group, 1)


def nan_where_non_finite(out: torch.Tensor, lse: torch.Tensor | None, bad: torch.Tensor):
    """The whole output (and LSE) of every non-finite head as NaN, as dense attention would give it."""
    out = torch.where(bad[..., None, None], float("nan"), out)
    return out, None if lse is None else torch.where(bad[..., None], float("nan"), lse)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_shape, config: BSAConfig | None = None,
              *, scale: float | None = None, enable_gqa: bool = False, score_mod: Callable | None = None,
              prefix_tokens: int = 0, suffix_tokens: int = 0, token_order: str = "raster",
              return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, BSAStats]:
    """Bidirectional Sparse Attention over a video's tokens.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] (the layout of ``F.scaled_dot_product_attention``),
    tokens in raster order over ``video_shape = (T, H, W)`` with S == T*H*W. Returns the output
    [B, Hq, S, D] in q's dtype, and with ``return_stats=True`` also a :class:`BSAStats`.

    ``config=None`` is the default sparse :class:`BSAConfig`; ``BSAConfig.dense()`` is full
    attention. ``enable_gqa`` allows Hq to be a multiple of Hkv. ``score_mod`` is a
    FlexAttention score_mod called with sequence positions (q_idx, kv_idx in 0..S-1).

    Joint attention: ``prefix_tokens`` / ``suffix_tokens`` non-video tokens (e.g. text) may come
    before / after the video tokens, S == prefix + T*H*W + suffix. They are never tiled or pruned:
    every one of them is a query over all keys, and every video query attends to all of them as
    keys besides its selected video KV blocks (the KV rule ranks video blocks only).

    ``token_order="tile"``: q, k, v come (and out returns) in the tile order of
    :func:`bsa_flex.tile_order` instead of sequence order, so that a model that permutes its tokens
    once keeps them so across its layers; a video without tile padding then needs no permutation
    of k and v here. ``score_mod`` and the stats still speak sequence positions.

    On CUDA, and on CPU without gradients, the operator runs as one compiled graph around
    FlexAttention, on CUDA with the kernel ``config.kernel`` asks for (FlashAttention-4 where
    it can run, by default); on CPU with gradients it runs the blockwise PyTorch path (eagerly).
    """
    config = BSAConfig() if config is None else config
    text = check_text_tokens(prefix_tokens, suffix_tokens)
    video_shape = check_inputs(q, k, v, video_shape, config, scale=scale, enable_gqa=enable_gqa,
                               score_mod=score_mod, text_tokens=text)
    check_choice("token_order", token_order, TOKEN_ORDERS)
    plan = make_plan(q, k, v, video_shape, config, scale=scale, score_mod=score_mod, text_tokens=text,
                     token_order=token_order)
    return run_operator(sparse_attention, q, k, v, plan, return_stats)
