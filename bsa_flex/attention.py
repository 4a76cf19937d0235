"""``bsa_flex.attention``: Bidirectional Sparse Attention, read top to bottom as in the paper."""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Callable, NamedTuple

import torch

from masks import (KeptQueries, Selection, TileLayout, fill_from_kept, gather_tokens, kv_block_probs, own_kv_blocks,
                   pool_blocks, select_kv_blocks, select_queries, tile_layout, to_tile_major, video_query_rows)

from .validation import check_inputs, check_text_tokens
from .config import BSAConfig
from .kernels import announce_kernel, choose_kernel, kernel_facts
from .paths import ATTEND, BSAEagerWarning
from .stats import BSAStats, collect_stats

__all__ = ["attention", "run_operator", "select_sparse", "sparse_attention", "SparseOperands", "BSARecompileWarning"]

log = logging.getLogger("bsa_flex")


class BSARecompileWarning(UserWarning):
    """The compiled BSA graph was compiled again, for a new input signature."""


class SparseOperands(NamedTuple):
    """What the attention kernel consumes: compact queries, tile-major keys/values, selections."""

    q_kept: torch.Tensor  # [B, Hq, Nq, D]
    k_slots: torch.Tensor  # [B, Hkv, n_slots, D]
    v_slots: torch.Tensor  # [B, Hkv, n_slots, D]
    kept: KeptQueries
    kv_blocks: torch.Tensor  # [B, Hq, Nq / block, n_slots / block] bool


def select_sparse(q, k, v, threshold: torch.Tensor, layout: TileLayout, config: BSAConfig,
                  scale: float) -> SparseOperands:
    """Tile, select queries, select KV blocks: every step of BSA before the attention kernel."""
    bs = layout.block_size
    kept = select_queries(q, layout, config.keep_per_window, config.fill)  # tile, select queries
    q_kept = gather_tokens(q, kept.kept_token)  # compact queries
    k_slots, v_slots = to_tile_major(k, layout), to_tile_major(v, layout)
    video_rows = video_query_rows(layout, config.keep_per_window)  # non-video query rows follow
    probs = kv_block_probs(pool_blocks(q_kept[:, :, :video_rows], kept.kept_valid[..., :video_rows], bs),
                           pool_blocks(k_slots, layout.slot_valid, bs), layout.kv_block_video, scale)
    own = own_kv_blocks(layout, config.keep_per_window, probs.shape[-2])
    kv_blocks = select_kv_blocks(probs, own, layout.kv_block_video, threshold, config.kv_rule,
                                 config.min_kv_blocks, config.max_kv_blocks)  # select KV blocks
    if layout.text_slot_start < layout.num_slots:  # non-video keys for every query, every key for non-video queries
        text_rows = q_kept.shape[2] // bs - probs.shape[-2]
        kv_blocks = torch.cat([kv_blocks | layout.kv_block_text,
                               layout.kv_block_valid.expand(*kv_blocks.shape[:2], text_rows, -1)], 2)
    return SparseOperands(q_kept, k_slots, v_slots, kept, kv_blocks)


def sparse_attention(q, k, v, threshold: torch.Tensor, layout: TileLayout, config: BSAConfig,
                     scale: float, score_mod: Callable | None, attend: Callable):
    """The BSA operator on validated inputs: (out [B, Hq, S, D], lse [B, Hq, S] or None, Selection).

    threshold: 0-dim float32 tensor holding the KV rule's number (p or z), a tensor so that
    changing it never recompiles. ``attend`` is ``paths.ATTEND[kernel]``: FlexAttention on a kernel,
    or the blockwise path.
    """
    ops = select_sparse(q, k, v, threshold, layout, config, scale)
    kept = ops.kept
    out_kept, lse_kept = attend(ops.q_kept, ops.k_slots, ops.v_slots, ops.kv_blocks, kept.kept_token, layout,
                                scale, score_mod)  # attend (block mask built inside)
    out = fill_from_kept(out_kept, kept, layout, config.keep_per_window)  # scatter, fill pruned queries, untile
    lse = None if lse_kept is None else lse_kept.gather(2, kept.fill_source)
    return out, lse, Selection(kept.kept_token, kept.kept_valid, kept.fill_source, ops.kv_blocks)


# Each shape, grad mode and kept count is one graph of the same function; dynamo's default budget
# (8 per function) would turn the 9th into a hard error under fullgraph, e.g. in a test suite or
# a schedule with many kept counts. The budget is raised around our own calls only.
_RECOMPILE_LIMIT = 64
_RAISED_RECOMPILE_LIMIT = torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)  # built once: hot path


def _compile(fn):
    """fullgraph, static shapes: a graph break or a dynamic shape would hide a slow path."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


@functools.cache
def _compiled(operator: Callable) -> Callable:
    """The one compiled version of ``operator`` (sparse_attention or a wrapper of it)."""
    return _compile(operator)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _run_compiled(operator: Callable, q, k, v, *args):
    """Run the compiled ``operator`` and say so whenever that compiled a new graph."""
    before = _graphs_compiled()
    raised = torch._dynamo.config.recompile_limit < _RECOMPILE_LIMIT
    with _RAISED_RECOMPILE_LIMIT if raised else contextlib.nullcontext():
        result = _compiled(operator)(q, k, v, *args)
    if _graphs_compiled() > before:
        _run_compiled.graphs += 1
        signature = (f"q {tuple(q.shape)} {q.dtype} on {q.device}, k/v {tuple(k.shape)}, "
                     f"requires_grad {q.requires_grad or k.requires_grad or v.requires_grad}")
        if _run_compiled.graphs == 1:
            log.info("bsa_flex: compiled the sparse-attention graph for %s", signature)
        else:
            warnings.warn(
                f"bsa_flex: compiled the sparse-attention graph again (graph #{_run_compiled.graphs}) for "
                f"{signature}. Each new shape, dtype, device, grad mode, scale, score_mod or structural "
                f"config value (query_keep_ratio, tile, window, block_size, kv_rule, min/max_kv_blocks, "
                f"fill, kernel) compiles once; kv_threshold and kv_zscore never recompile.",
                BSARecompileWarning, stacklevel=5)
    return result


_run_compiled.graphs = 0


@torch.compiler.assume_constant_result
def _layout(video_shape, tile, window, block_size: int, device: torch.device, prefix: int, suffix: int) -> TileLayout:
    """The cached tile layout; a constant to torch.compile, which must not trace its numpy code."""
    return tile_layout(video_shape, tile, window, block_size, device, prefix, suffix)


def _threshold_tensor(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The KV rule's number as a 0-dim float32 tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return _cached_threshold(value, device)


@torch.compiler.assume_constant_result
def _cached_threshold(value: float, device: torch.device) -> torch.Tensor:
    """One cached tensor per value, so eager calls make no host-to-device copy."""
    return _threshold_cache(value, device)


@functools.lru_cache(maxsize=256)
def _threshold_cache(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _choose_kernel(q, k, v, config: BSAConfig, score_mod: Callable | None) -> str:
    """The kernel this call runs on (see :mod:`bsa_flex.kernels`), logged the first time it is chosen."""
    facts = kernel_facts(q, config.block_size, _needs_grad(q, k, v), score_mod is not None)
    kernel, reason = choose_kernel(config.kernel, facts)
    announce_kernel(kernel, reason)
    return kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_shape, config: BSAConfig | None = None,
              *, scale: float | None = None, enable_gqa: bool = False, score_mod: Callable | None = None,
              prefix_tokens: int = 0, suffix_tokens: int = 0,
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

    On CUDA, and on CPU without gradients, the operator runs as one compiled graph around
    FlexAttention, on CUDA with the kernel ``config.kernel`` asks for (FlashAttention-4 where
    it can run, by default); on CPU with gradients it runs the blockwise PyTorch path (eagerly).
    """
    config = BSAConfig() if config is None else config
    text = check_text_tokens(prefix_tokens, suffix_tokens)
    video_shape = check_inputs(q, k, v, video_shape, config, scale, enable_gqa, score_mod, text)
    return run_operator(sparse_attention, q, k, v, video_shape, text, config, scale, score_mod, return_stats)


def run_operator(operator: Callable, q, k, v, video_shape: tuple[int, int, int], text: tuple[int, int],
                 config: BSAConfig, scale: float | None, score_mod: Callable | None, return_stats: bool):
    """Run ``operator`` on validated inputs: our compiled graph, inlined into the caller's, or eagerly.

    ``operator`` is :func:`sparse_attention`, or a wrapper taking and returning what it does but
    with q, k, v (and the output) laid out otherwise: ``bsa_flex.distributed`` hands it the
    all-to-all's received parts, so that reassembling the sequence fuses into the graph.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kernel = _choose_kernel(q, k, v, config, score_mod)
    # Inside a caller's compiled region on CPU, Inductor's C++ FlexAttention template finds no
    # kernel for a score_mod over our (constant) layout tensors (torch 2.13: NoValidChoicesError);
    # our own compiled graph, which takes the layout as an input, handles it.
    cpu_score_mod = q.device.type == "cpu" and score_mod is not None
    if kernel != "blockwise" and not (cpu_score_mod and torch.compiler.is_compiling()):
        return _attend(operator, q, k, v, video_shape, text, config, scale, score_mod, return_stats, kernel)
    if torch.compiler.is_compiling():
        reason = ("with gradients the blockwise path runs eagerly (FlexAttention has no CPU backward)"
                  if kernel == "blockwise" else
                  "a score_mod runs in bsa_flex's own compiled graph (the C++ FlexAttention template cannot "
                  "take it inside yours)")
        warnings.warn(f"bsa_flex: on CPU {reason}: a graph break in the compiled model", BSAEagerWarning,
                      stacklevel=3)
    return _attend_eagerly(operator, q, k, v, video_shape, text, config, scale, score_mod, return_stats, kernel)


def _attend(operator: Callable, q, k, v, video_shape, text: tuple[int, int], config: BSAConfig, scale: float,
            score_mod, return_stats: bool, kernel: str):
    """Layout, threshold, the operator (compiled unless already inside a compiled region), stats."""
    layout = _layout(video_shape, config.tile, config.window, config.block_size, q.device, *text)
    args = (q, k, v, _threshold_tensor(config.kv_rule_threshold, q.device), layout, config,
            scale, score_mod, ATTEND[kernel])
    if kernel == "blockwise" or torch.compiler.is_compiling():
        out, lse, selection = operator(*args)
    else:
        out, lse, selection = _run_compiled(operator, *args)
    if not return_stats:
        return out
    return out, collect_stats(selection, layout, lse, kernel)


# The blockwise path reads a host integer; under torch.compile it must be one clean graph break
# at this call, before any value the compiler would have to rebuild after the break.
_attend_eagerly = torch.compiler.disable(_attend)
