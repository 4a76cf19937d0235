"""FlexAttention BlockMask from the boolean KV-block matrix, built on device with no host sync."""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .layout import TileLayout
from .ordering import stable_argsort

__all__ = ["selection_mask_mod", "padding_mask_mod", "ordered_kv_blocks", "build_block_mask"]


def selection_mask_mod(kv_blocks: torch.Tensor, slot_valid: torch.Tensor, block_size: int):
    """The selection element by element: query block -> KV block lookup, padding keys masked.

    Uncompiled FlexAttention ignores block lists and applies only the mask_mod; this one makes
    such a call compute the same function as the block-skipping kernel (at dense cost).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_blocks[b, h, q_idx // block_size, kv_idx // block_size] & slot_valid[kv_idx]

    return mask_mod


def padding_mask_mod(slot_valid: torch.Tensor):
    """Padding keys masked, nothing else: what compiled kernels need inside partial blocks.

    Compiled, the block lists already restrict every query block to its selected KV blocks, so
    a selection lookup would only repeat them. Capturing the in-graph selection would also
    break Inductor's CPU Flex template (torch 2.13: wrong results, or no lowering at all).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return slot_valid[kv_idx]

    return mask_mod


def ordered_kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flex's (num_blocks, indices) pair for a boolean [..., nkv] matrix, selected blocks first."""
    as_int = blocks.to(torch.int32)
    indices = stable_argsort(as_int, descending=True).to(torch.int32)
    return as_int.sum(-1, dtype=torch.int32).contiguous(), indices


def build_block_mask(kv_blocks: torch.Tensor, layout: TileLayout) -> BlockMask:
    """BlockMask over compact queries x tile-major slots for a [B, Hq, nq, nkv] bool block matrix.

    Selected blocks made only of real tokens go to the ``full`` lists (the kernel skips the
    mask_mod there); blocks mixing real and padding slots go to the partial lists. The
    backward's query lists are the same lists of the transposed matrix, computed exactly as
    Flex's ``from_kv_blocks`` does but with our opaque sort (Flex's own would compile a Triton
    sort over the query blocks: minutes at Wan shapes). An earlier variant that built its own
    lists differently crashed the backward at 153,600 tokens (illegal memory access, torch
    2.11, H200); these are tested bit-identical to Flex's. Under torch.compile the mask_mod
    masks padding only; uncompiled it encodes the whole selection.
    """
    bs = layout.block_size
    partial = kv_blocks & layout.kv_block_partial
    full = kv_blocks & ~layout.kv_block_partial
    # four separate sorts: lists cut from one stacked sort broke Inductor's CPU Flex template
    # (torch 2.13: C++ compile error, kv_num_blocks undeclared)
    kv_num, kv_indices = ordered_kv_blocks(partial)
    full_kv_num, full_kv_indices = ordered_kv_blocks(full)
    q_num, q_indices = ordered_kv_blocks(partial.transpose(-2, -1))
    full_q_num, full_q_indices = ordered_kv_blocks(full.transpose(-2, -1))
    return BlockMask(
        seq_lengths=(kv_blocks.shape[-2] * bs, layout.num_slots),
        kv_num_blocks=kv_num, kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_indices,
        q_num_blocks=q_num, q_indices=q_indices,
        full_q_num_blocks=full_q_num, full_q_indices=full_q_indices,
        BLOCK_SIZE=(bs, bs),
        mask_mod=(padding_mask_mod(layout.slot_valid) if torch.compiler.is_compiling()
                  else selection_mask_mod(kv_blocks, layout.slot_valid, bs)),
    )
