"""What one BSA call computed: sparsity, kept queries, KV density, and the selection itself."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from masks import Selection, TileLayout

__all__ = ["BSAStats", "collect_stats", "concat_heads"]


@dataclass(frozen=True)
class BSAStats:
    """Statistics of one call; tensors stay on the device (read them with ``float()``/``.tolist()``).

    sparsity: fraction of the S x S query-key pairs of full attention that were not computed
    (0.0 for dense), averaged over batch and heads; ``sparsity_per_head`` is [B, Hq].
    kept_query_fraction: real kept queries over S (with the fill "local", the pruned queries' own rows
    do not count; their KV blocks count in the sparsity). kv_density: [B, Hq] fraction of (query block,
    KV block) pairs selected among those with real tokens. lse: [B, Hq, S] float32 natural-log
    softmax normaliser of the row each token's output comes from (None on the CPU FlexAttention
    path, which has no LSE; without gradient on the "flash" kernel). kernel: the attention kernel
    that ran: "flash" (FlashAttention-4) or "triton" on CUDA, "flex_cpu" (FlexAttention's CPU
    template) or "blockwise" (the CPU autograd path). path: "flex" or "blockwise". layout: the
    tile layout the selection is expressed in (slots, blocks), to read it without rebuilding one.
    """

    sparsity: torch.Tensor
    sparsity_per_head: torch.Tensor
    kept_query_fraction: torch.Tensor
    kv_density: torch.Tensor
    selection: Selection
    lse: torch.Tensor | None
    kernel: str
    layout: TileLayout

    @property
    def path(self) -> str:
        """The attention path that ran: "flex" (FlexAttention on any kernel) or "blockwise"."""
        return "blockwise" if self.kernel == "blockwise" else "flex"


def collect_stats(selection: Selection, layout: TileLayout, lse: torch.Tensor | None, kernel: str) -> BSAStats:
    """Derive the statistics from a selection (small block-level tensors only)."""
    B, H, _ = selection.kept_valid.shape
    q_count = selection.kept_valid.view(B, H, -1, layout.block_size).sum(-1).float()  # [B, H, nq]
    kv_blocks = selection.kv_blocks.float()
    keys = (kv_blocks * layout.kv_block_valid_count.float()).sum(-1)  # [B, H, nq]
    S = layout.num_tokens
    sparsity_per_head = 1.0 - (q_count * keys).sum(-1) / float(S * S)
    real_pairs = (q_count > 0).float().sum(-1) * layout.kv_block_valid.sum().float()
    kv_density = (kv_blocks * (q_count > 0).float()[..., None]).sum((-1, -2)) / real_pairs
    return BSAStats(
        sparsity=sparsity_per_head.mean(), sparsity_per_head=sparsity_per_head,
        kept_query_fraction=(selection.kept_valid & ~selection.local_row).sum(-1).float().mean() / S,
        kv_density=kv_density,
        selection=selection, lse=lse, kernel=kernel, layout=layout,
    )


def concat_heads(parts: list[BSAStats]) -> BSAStats:
    """The stats of one call made of calls over consecutive, equally sized groups of heads."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda tensors: torch.cat(list(tensors), 1)  # noqa: E731  (dim 1: heads)
    sparsity_per_head = cat(p.sparsity_per_head for p in parts)
    return BSAStats(
        sparsity=sparsity_per_head.mean(), sparsity_per_head=sparsity_per_head,
        kept_query_fraction=torch.stack([p.kept_query_fraction for p in parts]).mean(),
        kv_density=cat(p.kv_density for p in parts),
        selection=Selection(*(cat(fields) for fields in zip(*(p.selection for p in parts)))),
        lse=None if parts[0].lse is None else cat(p.lse for p in parts),
        kernel=parts[0].kernel, layout=parts[0].layout,
    )
