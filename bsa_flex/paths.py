"""The two ways to attend from compact queries to the selected KV blocks.

flex: FlexAttention with a BlockMask; runs compiled (CUDA forward+backward, CPU forward).
blockwise: plain PyTorch over the gathered selected blocks of each query block; it has
autograd everywhere and is the CPU training path (FlexAttention has no CPU backward).
Both return (out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32 or None).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
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


@torch.compiler.disable
def attend_blockwise(q_kept, k_slots, v_slots, kv_blocks, kept_token, plan: BSAPlan):
    """Float32 softmax attention of each query block over its gathered selected KV blocks.

    Memory grows with the number of selected blocks, never with S x S. The gather width is the
    largest selected count, read on the host: this path runs eagerly (a graph break under
    torch.compile), which is why it is only used where FlexAttention has no backward.
    """
    B, Hq, Nq, D = q_kept.shape
    layout, score_mod = plan.layout, plan.score_mod
    bs, device = layout.block_size, q_kept.device
    n_selected, order = ordered_kv_blocks(kv_blocks)
    width = int(n_selected.max())
    in_use = torch.arange(width, device=device) < n_selected[..., None]  # [B, Hq, nq, width]
    key_slot = (order[..., :width, None].long() * bs + torch.arange(bs, device=device)).flatten(-2)
    key_ok = in_use.repeat_interleave(bs, -1) & layout.slot_valid[key_slot]

    batch = torch.arange(B, device=device)[:, None, None, None]
    kv_head = (torch.arange(Hq, device=device) // (Hq // k_slots.shape[1]))[None, :, None, None]
    keys = k_slots[batch, kv_head, key_slot].float()  # [B, Hq, nq, width * bs, D]
    values = v_slots[batch, kv_head, key_slot].float()
    queries = q_kept.float().view(B, Hq, -1, bs, D)
    scores = queries @ keys.transpose(-1, -2) * plan.scale  # [B, Hq, nq, bs, width * bs]
    if score_mod is not None:
        mod = raster_score_mod(score_mod, kept_token, layout.slot_token)
        q_idx = torch.arange(Nq, device=device).view(1, 1, -1, bs, 1)
        scores = mod(scores, batch[..., None], torch.arange(Hq, device=device)[None, :, None, None, None],
                     q_idx, key_slot[..., None, :])
    scores = scores.masked_fill(~key_ok[..., None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ values
    return out.reshape(B, Hq, Nq, D).to(q_kept.dtype), lse.reshape(B, Hq, Nq)


def attend_path(kernel: str) -> Callable:
    """The attention path of a kernel of :func:`bsa_flex.kernels.choose_kernel`."""
    return attend_blockwise if kernel == "blockwise" else attend_flex
