"""FlexAttention BlockMask from the boolean KV-block matrix, built on device with no host sync."""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .layout import TileLayout
from .ordering import selected_first

__all__ = ["selection_mask_mod", "padding_mask_mod", "slot_is_real", "ordered_kv_blocks", "build_block_mask"]


def selection_mask_mod(kv_blocks: torch.Tensor, slot_valid: torch.Tensor, block_size: int):
    """The selection element by element: query block -> KV block lookup, padding keys masked.

    Uncompiled FlexAttention ignores block lists and applies only the mask_mod; this one makes
    such a call compute the same function as the block-skipping kernel (at dense cost).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_blocks[b, h, q_idx // block_size, kv_idx // block_size] & slot_valid[kv_idx]

    return mask_mod


def _axis_real(coordinate, size: int, padded: int):
    """coordinate < size, or no comparison at all where the axis has no padding."""
    return None if size == padded else coordinate < size


def slot_is_real(slot, layout: TileLayout):
    """Whether each tile-major slot holds a real token, by integer arithmetic on the slot index.

    Equal to ``layout.slot_valid[slot]`` (tested), but reads no tensor: a mask_mod built on it
    captures no buffer, which FlexAttention's FLASH backend needs (torch 2.11: a captured buffer
    broke its no-grad graphs), and it is never the trivial all-true mask (with which FLASH
    would ignore the block lists).
    """
    (tt, th, tw), (wt, wh, ww) = layout.tile, layout.window
    T, H, W = layout.video_shape
    grid = [-(-n // t) for n, t in zip(layout.video_shape, layout.tile)]
    tile, rest = slot // layout.tile_tokens, slot % layout.tile_tokens
    window, offset = rest // layout.window_tokens, rest % layout.window_tokens
    per_tile = (tt // wt, th // wh, tw // ww)
    t = (tile // (grid[1] * grid[2])) * tt + (window // (per_tile[1] * per_tile[2])) * wt + offset // (wh * ww)
    h = (tile // grid[2] % grid[1]) * th + (window // per_tile[2] % per_tile[1]) * wh + offset // ww % wh
    w = (tile % grid[2]) * tw + (window % per_tile[2]) * ww + offset % ww
    real = slot < layout.num_video_slots
    for check in (_axis_real(t, T, grid[0] * tt), _axis_real(h, H, grid[1] * th), _axis_real(w, W, grid[2] * tw)):
        if check is not None:
            real = real & check
    num_text = layout.num_prefix + layout.num_suffix
    if num_text:
        real = real | ((slot >= layout.text_slot_start) & (slot < layout.text_slot_start + num_text))
    return real


def padding_mask_mod(layout: TileLayout):
    """Padding keys masked, nothing else: what compiled kernels need inside partial blocks.

    Compiled, the block lists already restrict every query block to its selected KV blocks, so
    a selection lookup would only repeat them. Capturing the in-graph selection would also
    break Inductor's CPU Flex template (torch 2.13: wrong results, or no lowering at all).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return slot_is_real(kv_idx, layout)

    return mask_mod


def ordered_kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flex's (num_blocks, indices) pair for a boolean [..., nkv] matrix, selected blocks first."""
    return selected_first(blocks)


def empty_block_lists(shape: torch.Size, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ordered_kv_blocks`` of an all-False matrix of ``shape`` [..., n]: counts 0, indices in order."""
    count = torch.zeros(shape[:-1], dtype=torch.int32, device=device)
    return count, torch.arange(shape[-1], dtype=torch.int32, device=device).expand(shape).contiguous()


def build_block_mask(kv_blocks: torch.Tensor, layout: TileLayout) -> BlockMask:
    """BlockMask over compact queries x tile-major slots for a [B, Hq, nq, nkv] bool block matrix.

    Selected blocks made only of real tokens go to the ``full`` lists (the kernel skips the
    mask_mod there); blocks mixing real and padding slots go to the partial lists. The
    backward's query lists are the same lists of the transposed matrix, equal to what Flex's
    ``from_kv_blocks`` computes, but by a stream compaction instead of a sort (Flex's own sort
    would compile as a Triton sort over the query blocks: minutes at Wan shapes). An earlier variant that built its own
    lists differently crashed the backward at 153,600 tokens (illegal memory access, torch
    2.11, H200); these are tested bit-identical to Flex's. Under torch.compile the mask_mod
    masks padding only; uncompiled it encodes the whole selection.
    """
    bs = layout.block_size
    if layout.has_partial_kv_blocks:
        partial = kv_blocks & layout.kv_block_partial
        full = kv_blocks & ~layout.kv_block_partial
        # separate compactions: lists cut from one stacked sort broke Inductor's CPU Flex
        # template (torch 2.13: C++ compile error, kv_num_blocks undeclared)
        kv_num, kv_indices = ordered_kv_blocks(partial)
        q_num, q_indices = ordered_kv_blocks(partial.transpose(-2, -1))
    else:  # a video of whole tiles and blocks: the partial lists are empty, known without a pass
        full = kv_blocks
        kv_num, kv_indices = empty_block_lists(kv_blocks.shape, kv_blocks.device)
        q_num, q_indices = empty_block_lists(kv_blocks.transpose(-2, -1).shape, kv_blocks.device)
    full_kv_num, full_kv_indices = ordered_kv_blocks(full)
    full_q_num, full_q_indices = ordered_kv_blocks(full.transpose(-2, -1))
    return BlockMask(
        seq_lengths=(kv_blocks.shape[-2] * bs, layout.num_slots),
        kv_num_blocks=kv_num, kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_indices,
        q_num_blocks=q_num, q_indices=q_indices,
        full_q_num_blocks=full_q_num, full_q_indices=full_q_indices,
        BLOCK_SIZE=(bs, bs),
        mask_mod=(padding_mask_mod(layout) if torch.compiler.is_compiling()
                  else selection_mask_mod(kv_blocks, layout.slot_valid, bs)),
    )
