"""The two ways to attend from compact queries to the selected KV blocks.

flex: FlexAttention with a BlockMask; runs compiled (CUDA forward+backward, CPU forward).
blockwise: plain PyTorch over the gathered selected blocks of each query block; it has
autograd everywhere and is the CPU training path (FlexAttention has no CPU backward).
Both return (out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32 or None).
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from masks import build_block_mask, ordered_kv_blocks

from .kernels import flash_lse_to_natural_log
from .plan import BSAPlan

__all__ = ["BSAEagerWarning", "raster_score_mod", "flex_kernel_options", "attend_flex", "attend_blockwise",
           "attend_path"]


class BSAEagerWarning(UserWarning):
    """FlexAttention ran without torch.compile: correct, but dense in cost."""


def raster_score_mod(score_mod: Callable, kept_token: torch.Tensor, slot_token: torch.Tensor) -> Callable:
    """Wrap a user score_mod so that it sees raster token positions, not compact/tile-major ones."""

    def mod(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, kept_token[b, h, q_idx], slot_token[kv_idx])

    return mod


def flex_kernel_options(kernel: str, block_size: int) -> dict | None:
    """FlexAttention's kernel options for a kernel of :func:`bsa_flex.kernels.choose_kernel`.

    CUDA names its backend, so that Flex never picks another one itself (its decoding kernel
    for short query lists, say). Triton's forward needs tiles that divide blocks under 128
    tokens; there is no such setting for the backward (torch 2.11 finds no valid kernel), so
    ``attention`` refuses that combination up front.
    """
    if kernel == "flash":
        return {"BACKEND": "FLASH"}
    if kernel == "triton":
        return {"BACKEND": "TRITON", **({"BLOCK_M": block_size, "BLOCK_N": block_size} if block_size < 128 else {})}
    return None  # FlexAttention's CPU template


def attend_flex(q_kept, k_slots, v_slots, kv_blocks, kept_token, plan: BSAPlan):
    """FlexAttention of compact queries over tile-major slots, skipping unselected KV blocks.

    ``plan.kernel``: "flash", "triton" (CUDA) or "flex_cpu". The LSE is in natural log on every
    kernel; with "flash" it carries no gradient (FLASH's backward has none for it).
    """
    layout, score_mod = plan.layout, plan.score_mod
    if not torch.compiler.is_compiling():
        warnings.warn("bsa_flex: FlexAttention is running uncompiled (torch.compile disabled or fell back): "
                      "it computes the same function through the mask_mod, but at dense cost, "
                      "materialising S x S scores.", BSAEagerWarning, stacklevel=2)
    mod = None if score_mod is None else raster_score_mod(score_mod, kept_token, layout.slot_token)
    if plan.kernel == "flex_cpu" and k_slots.stride() != v_slots.stride():
        # torch 2.13's C++ template, inlined into a caller's graph with fewer queries than keys,
        # reads k and v of different strides wrongly (NOTES.md, 2026-12-02); the tile order passes them as they come
        k_slots, v_slots = k_slots.contiguous(), v_slots.contiguous()
    with_lse = q_kept.device.type == "cuda"  # FlexAttention on CPU has no LSE under compile
    result = flex_attention(
        q_kept, k_slots, v_slots, score_mod=mod, block_mask=build_block_mask(kv_blocks, layout),
        scale=plan.scale, enable_gqa=q_kept.shape[1] != k_slots.shape[1],
        kernel_options=flex_kernel_options(plan.kernel, layout.block_size),
        return_aux=AuxRequest(lse=True) if with_lse else None,
    )
    if not with_lse:
        return result, None
    out, aux = result
    if plan.kernel == "flash":
        return out, flash_lse_to_natural_log(aux.lse.detach())
    return out, aux.lse


# Float32 bytes one chunk of query blocks may gather on the blockwise path (keys, values, scores).
BLOCKWISE_CHUNK_BYTES = 32 * 2**20


class _Chunk(NamedTuple):
    """Consecutive query blocks of consecutive query heads, attended together on the blockwise path."""

    first: int  # its first query block
    first_head: int  # its first query head
    group: int  # query heads per key/value head (GQA)
    order: torch.Tensor  # [B, h, c, width] int32: selected KV blocks first
    n_selected: torch.Tensor  # [B, h, c] int32


def _chunks(n_selected: torch.Tensor, order: torch.Tensor, block_bytes: int, group: int) -> list[_Chunk]:
    """Heads x query blocks cut into chunks that gather at most BLOCKWISE_CHUNK_BYTES (one host read).

    ``block_bytes``: what one query block of one head gathers per selected KV block. Heads are
    the outer loop, so that the chunks of one head group share one slice of the keys and values.
    """
    widest = n_selected.amax((0, 1)).tolist()  # per query block, over batch and heads
    per_head_block = block_bytes * max(1, max(widest))
    heads = max(1, min(n_selected.shape[1], BLOCKWISE_CHUNK_BYTES // per_head_block))
    blocks = max(1, BLOCKWISE_CHUNK_BYTES // (per_head_block * heads))
    return [_Chunk(first, h, group, order[:, h:h + heads, first:first + blocks,
                                         :max(1, max(widest[first:first + blocks]))],
                   n_selected[:, h:h + heads, first:first + blocks])
            for h in range(0, n_selected.shape[1], heads) for first in range(0, len(widest), blocks)]


def _attend_chunk(q_chunk, k_heads, v_heads, chunk: _Chunk, kept_token, plan: BSAPlan):
    """Float32 softmax attention of a chunk [B, h, c * bs, D] of query blocks and heads over their gathered
    blocks; ``k_heads``/``v_heads`` [B, hkv, n_slots, D] are the key/value heads its query heads use."""
    B, heads, rows, D = q_chunk.shape
    layout, device = plan.layout, q_chunk.device
    bs, width = layout.block_size, chunk.order.shape[-1]
    in_use = torch.arange(width, device=device) < chunk.n_selected[..., None]  # [B, h, c, width]
    key_slot = (chunk.order[..., None].long() * bs + torch.arange(bs, device=device)).flatten(-2)
    key_ok = in_use.repeat_interleave(bs, -1) & layout.slot_valid[key_slot]
    batch = torch.arange(B, device=device)[:, None, None, None]
    head = chunk.first_head + torch.arange(heads, device=device)[None, :, None, None]  # query heads
    kv_head = head // chunk.group - chunk.first_head // chunk.group  # within k_heads
    keys = k_heads[batch, kv_head, key_slot].float()  # [B, h, c, width * bs, D]
    values = v_heads[batch, kv_head, key_slot].float()
    queries = q_chunk.float().view(B, heads, -1, bs, D) * plan.scale  # scaled here: the smaller tensor
    scores = queries @ keys.transpose(-1, -2)  # [B, h, c, bs, width * bs]
    if plan.score_mod is not None:
        mod = raster_score_mod(plan.score_mod, kept_token, layout.slot_token)
        q_idx = chunk.first * bs + torch.arange(rows, device=device).view(1, 1, -1, bs, 1)
        scores = mod(scores, batch[..., None], head[..., None], q_idx, key_slot[..., None, :])
    masked = ~key_ok[..., None, :]  # in place where nothing saved the scores for a backward
    scores = scores.masked_fill(masked, float("-inf")) if plan.score_mod else scores.masked_fill_(masked, float("-inf"))
    out, lse = _softmax_attention(scores, values)
    return out.reshape(B, heads, rows, D).to(q_chunk.dtype), lse.reshape(B, heads, rows)


def _softmax_attention(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ values and the rows' natural-log LSE, with one exponential of the scores.

    The row maximum is detached (the result does not depend on it); a row with no key gives
    output 0 and LSE -inf, as FlexAttention does, and zero gradients (its sum is divided by 1,
    not by a tiny number whose reciprocal would overflow the backward); a NaN score stays NaN.
    """
    row_max = scores.detach().amax(-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    weights = (scores - row_max).exp_()
    total = weights.sum(-1, keepdim=True)
    out = (weights @ values) / torch.where(total == 0, 1.0, total)
    return out, (row_max + total.log()).squeeze(-1)


@torch.compiler.disable
def attend_blockwise(q_kept, k_slots, v_slots, kv_blocks, kept_token, plan: BSAPlan):
    """Float32 softmax attention of each query block over its gathered selected KV blocks.

    Query blocks go in chunks that gather at most BLOCKWISE_CHUNK_BYTES; with gradients each
    chunk is recomputed in the backward (activation checkpointing), so memory beyond the inputs
    and outputs never exceeds what one chunk's selected blocks need, never S x S. The chunks'
    widths are read on the host: this path runs eagerly (a graph break under torch.compile),
    which is why it is only used where FlexAttention has no backward.
    """
    B, Hq, _, D = q_kept.shape
    bs, group = plan.layout.block_size, Hq // k_slots.shape[1]
    n_selected, order = ordered_kv_blocks(kv_blocks)
    block_bytes = 4 * B * bs * (2 * D + 2 * bs)  # float32 keys and values, scores and probabilities
    chunks = _chunks(n_selected, order, block_bytes, group)
    # one chunk holds at most its budget anyway: recompute only where chunks would pile up
    recompute = len(chunks) > 1 and torch.is_grad_enabled() and any(t.requires_grad for t in (q_kept, k_slots, v_slots))
    by_head_group: dict[int, list] = {}
    for chunk in chunks:
        heads, blocks = chunk.order.shape[1:3]
        if chunk.first_head not in by_head_group:  # one slice per head group: one gradient of its size
            kv_heads = slice(chunk.first_head // group, (chunk.first_head + heads - 1) // group + 1)
            k_heads, v_heads = k_slots[:, kv_heads], v_slots[:, kv_heads]
            q_heads = q_kept[:, chunk.first_head:chunk.first_head + heads]
            by_head_group[chunk.first_head] = []
        rows = q_heads[:, :, chunk.first * bs:(chunk.first + blocks) * bs]
        args = (rows, k_heads, v_heads, chunk, kept_token, plan)
        result = checkpoint(_attend_chunk, *args, use_reentrant=False) if recompute else _attend_chunk(*args)
        by_head_group[chunk.first_head].append(result)
    out = torch.cat([torch.cat([o for o, _ in blocks], 2) for blocks in by_head_group.values()], 1)
    lse = torch.cat([torch.cat([lse for _, lse in blocks], 2) for blocks in by_head_group.values()], 1)
    return out, lse


def attend_path(kernel: str) -> Callable:
    """The attention path of a kernel of :func:`bsa_flex.kernels.choose_kernel`."""
    return attend_blockwise if kernel == "blockwise" else attend_flex
