"""BSAConfig: every knob of Bidirectional Sparse Attention, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from masks import FILL_POLICIES, KV_RULES, ZSCORE_RANGE

from .kernels import KERNELS
from .validation import check_bool, check_choice, check_int, check_real, check_triple

__all__ = ["BSAConfig", "keep_count"]


def keep_count(query_keep_ratio: float, window_tokens: int) -> int:
    """Kept queries per window for a keep ratio: ceil(ratio * window tokens), at least 1."""
    return max(1, math.ceil(query_keep_ratio * window_tokens - 1e-9))


@dataclass(frozen=True)
class BSAConfig:
    """Configuration of one BSA attention call.

    Query side: the video is cut into ``tile``-sized 3D tiles and each tile into ``window``-sized
    windows; per window the centre and the least similar queries are kept, ``ceil(ratio *
    window tokens)`` of them. ``fill`` says which kept query's output a pruned query copies.
    KV side: per query block of ``block_size`` compact queries, KV blocks of ``block_size``
    tile-major tokens are chosen by ``kv_rule``: "cumulative" keeps the fewest blocks whose
    pooled attention mass reaches ``kv_threshold`` (1.0 keeps all), "zscore" keeps blocks above
    mean + ``kv_zscore`` * std. The ``min_kv_blocks`` most probable blocks are always kept, and
    with ``force_own_kv_blocks`` the KV blocks of the query block's own tiles too (off, the rule
    alone decides, as in FastVideo's BSA); ``max_kv_blocks`` (a budget) caps what the rule adds,
    or ``kv_budget`` does as a fraction of the video's KV blocks (ceil(kv_budget * blocks) of them,
    for every sequence length; at most one of the two). In fine-tuning a trained model to a
    target sparsity, a budget of 1 - target (p 0.95-0.98) lost half as much validation loss
    as the same sparsity reached by a lower p without a budget (docs/training.md, 2026-12-05).
    ``fill``: the output a pruned query takes, its window's most similar kept query's
    ("most_similar"), its centre's ("anchor"), the nearest kept query's in space-time
    ("nearest"), or 0 ("none": in a residual block the token passes through unchanged); or
    ("local") none: the pruned query attends to its own tile's KV blocks (and the non-video tokens)
    only, as a row of its own in the kernel; its query block attends to the blocks of every tile its
    rows come from (128-token blocks, 4x4x4 tiles, keep 0.5: four tiles, 2 KV blocks), counted in the
    stats' sparsity. ``local_extra_kv_blocks`` (fill "local" only) lets each block of those rows attend
    that many more KV blocks beyond its tiles', the most probable by its pooled queries (the KV rule's
    scores, no threshold): the global context a pruned query lacks when it sees its own tile only.

    ``kernel`` picks the CUDA attention kernel: "flash" (FlashAttention-4 through FlexAttention's
    FLASH backend), "triton" (FlexAttention's Triton kernel) or "auto" (FLASH wherever it can
    run correctly, else Triton; the only value that runs on CPU). ``stats.kernel`` says which ran.

    ``kv_threshold`` and ``kv_zscore`` may be 0-dim float tensors: a schedule that updates such
    a tensor in place changes the threshold without recompiling, even inside a model compiled
    as a whole (a Python float there is a constant of the graph). A tensor's value is checked
    here once; updated later to a value outside its range it acts as the nearest valid value
    (p clamped into (0, 1], z into [-1e6, 1e6]) and NaN as the densest (p = 1, z = -1e6), so a
    bad value never makes attention sparser than asked. The other fields set shapes
    or code and compile once per distinct value.

    Default ``query_keep_ratio=1.0`` (the KV side alone): in our training runs it is the only split
    that reached full attention's validation loss, and pruning queries cost the most quality in
    both regimes measured (benchmarks/results/frontier_2026-12-02, docs/training.md). The paper's
    bidirectional setting is ``query_keep_ratio=0.5``.
    """

    query_keep_ratio: float = 1.0
    kv_threshold: float | torch.Tensor = 0.9
    tile: tuple[int, int, int] = (4, 4, 4)
    window: tuple[int, int, int] = (2, 2, 2)
    min_kv_blocks: int = 1
    max_kv_blocks: int | None = None
    kv_budget: float | None = None
    kv_rule: str = "cumulative"
    kv_zscore: float | torch.Tensor = 1.0
    fill: str = "most_similar"
    local_extra_kv_blocks: int = 0
    force_own_kv_blocks: bool = True
    block_size: int = 128
    kernel: str = "auto"

    def __post_init__(self):
        check_real("BSAConfig.query_keep_ratio", self.query_keep_ratio, 0.0, 1.0, low_open=True)
        check_real("BSAConfig.kv_threshold", self.kv_threshold, 0.0, 1.0, low_open=True, tensor_ok=True)
        check_real("BSAConfig.kv_zscore", self.kv_zscore, *ZSCORE_RANGE, tensor_ok=True)
        object.__setattr__(self, "tile", check_triple("BSAConfig.tile", self.tile))
        object.__setattr__(self, "window", check_triple("BSAConfig.window", self.window))
        if any(t % w for t, w in zip(self.tile, self.window)):
            raise ValueError(f"BSAConfig.window {self.window} must divide BSAConfig.tile {self.tile} on every axis")
        check_int("BSAConfig.min_kv_blocks", self.min_kv_blocks, 0)
        check_int("BSAConfig.max_kv_blocks", self.max_kv_blocks, 1, optional=True)
        if self.kv_budget is not None:
            check_real("BSAConfig.kv_budget", self.kv_budget, 0.0, 1.0, low_open=True)
            if self.max_kv_blocks is not None:
                raise ValueError(f"BSAConfig.kv_budget ({self.kv_budget}) and BSAConfig.max_kv_blocks "
                                 f"({self.max_kv_blocks}) both cap the KV rule: give at most one")
        check_choice("BSAConfig.kv_rule", self.kv_rule, KV_RULES)
        check_choice("BSAConfig.fill", self.fill, FILL_POLICIES)
        check_int("BSAConfig.local_extra_kv_blocks", self.local_extra_kv_blocks, 0)
        if self.local_extra_kv_blocks and self.fill != "local":
            raise ValueError(f"BSAConfig.local_extra_kv_blocks ({self.local_extra_kv_blocks}) applies to the rows "
                             f"of fill='local' only, got fill={self.fill!r}: set fill='local' or leave it 0")
        check_bool("BSAConfig.force_own_kv_blocks", self.force_own_kv_blocks)
        if not self.force_own_kv_blocks and self.min_kv_blocks < 1:
            raise ValueError("BSAConfig.force_own_kv_blocks=False needs min_kv_blocks >= 1: otherwise the "
                             "z-score rule may leave a query block with no KV block at all")
        check_choice("BSAConfig.kernel", self.kernel, KERNELS)
        check_int("BSAConfig.block_size", self.block_size, 16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"BSAConfig.block_size must be a power of two >= 16, got {self.block_size}")

    @classmethod
    def dense(cls, **overrides) -> "BSAConfig":
        """Every query kept, every KV block kept: full attention through the BSA machinery."""
        return cls(**{"query_keep_ratio": 1.0, "kv_threshold": 1.0, **overrides})

    @property
    def keep_per_window(self) -> int:
        """Kept queries per window: ceil(query_keep_ratio * window tokens), at least 1."""
        return keep_count(self.query_keep_ratio, math.prod(self.window))

    def kv_block_cap(self, video_kv_blocks: int) -> int | None:
        """The most KV blocks the rule adds per query block, for a video of ``video_kv_blocks`` KV blocks
        (``max_kv_blocks``, or ``kv_budget``'s share rounded up, at least 1); None without a cap."""
        if self.kv_budget is None:
            return self.max_kv_blocks
        return max(1, math.ceil(self.kv_budget * video_kv_blocks - 1e-9))

    @property
    def kv_rule_threshold(self) -> float | torch.Tensor:
        """The number the KV rule compares against: p for "cumulative", z for "zscore"."""
        return self.kv_threshold if self.kv_rule == "cumulative" else self.kv_zscore
