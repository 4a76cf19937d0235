"""Pictures of what BSA selected: kept queries over the video, KV blocks per head, sparsity per layer.

Needs matplotlib (``pip install 'bsa-flex[viz]'``). The array functions (``kept_query_map``) do
not; the ``plot_*`` functions write a PNG and return its path.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from masks import Selection

from .attention import attention
from .config import BSAConfig
from .modules import BSAttention, layer_stats, rope_3d
from .extras import pyplot
from .validation import is_integer
from .schedule import SparsitySchedule
from .synthetic import video_qkv

__all__ = ["kept_query_map", "plot_kept_queries", "plot_kv_blocks", "plot_sparsity_per_layer"]


def _pyplot():
    return pyplot("bsa_flex.viz")


def _selection(stats_or_selection) -> Selection:
    selection = getattr(stats_or_selection, "selection", stats_or_selection)
    if not isinstance(selection, Selection):
        raise TypeError(f"expected a BSAStats or a Selection, got {type(stats_or_selection).__name__}")
    return selection


def _check_index(name: str, value: int, size: int) -> None:
    if not is_integer(value) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")


def kept_query_map(stats_or_selection, video_shape, *, batch: int = 0, head: int = 0) -> torch.Tensor:
    """[T, H, W] bool on the CPU: which tokens BSA kept as queries (the rest copy a kept query's output, or
    with the fill "local" attend to their own tile only)."""
    selection = _selection(stats_or_selection)
    B, Hq, _ = selection.kept_token.shape
    _check_index("batch", batch, B)
    _check_index("head", head, Hq)
    S = math.prod(video_shape)
    if selection.fill_source.shape[-1] != S:
        raise ValueError(f"video_shape {tuple(video_shape)} holds {S} tokens, the selection {selection.fill_source.shape[-1]}")
    kept = torch.zeros(S, dtype=torch.bool)
    tokens = selection.kept_token[batch, head][(selection.kept_valid & ~selection.local_row)[batch, head]].cpu()
    kept[tokens] = True
    return kept.view(*video_shape)


def plot_kept_queries(stats_or_selection, video_shape, path: str, *, frames: Sequence[int] | None = None,
                      batch: int = 0, head: int = 0) -> str:
    """PNG of the kept-query map, one panel per frame (default: up to 8 frames spread over the clip)."""
    plt = _pyplot()
    kept = kept_query_map(stats_or_selection, video_shape, batch=batch, head=head)
    T = video_shape[0]
    frames = list(range(0, T, max(1, T // 8)))[:8] if frames is None else list(frames)
    for f in frames:
        _check_index("frame", f, T)
    fig, axes = plt.subplots(1, len(frames), figsize=(1.9 * len(frames), 2.3), squeeze=False)
    for ax, f in zip(axes[0], frames):
        ax.imshow(kept[f].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"frame {f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"kept queries (black), head {head}: {float(kept.float().mean()):.2f} of the tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kv_blocks(stats_or_selection, path: str, *, batch: int = 0, heads: Sequence[int] = (0,)) -> str:
    """PNG of the KV-block selection matrix (query blocks x KV blocks, tile-major order), one panel per head."""
    plt = _pyplot()
    selection = _selection(stats_or_selection)
    B, Hq = selection.kv_blocks.shape[:2]
    _check_index("batch", batch, B)
    for h in heads:
        _check_index("head", h, Hq)
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads):
        blocks = selection.kv_blocks[batch, h].cpu()
        ax.imshow(blocks.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set(title=f"head {h}: {float(blocks.float().mean()):.3f} of the blocks", xlabel="KV block (tile-major)",
               ylabel="query block (kept queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sparsity_per_layer(rows: Sequence[dict], path: str) -> str:
    """PNG bar chart of achieved sparsity per layer from ``bsa_flex.layer_stats`` rows (dense layers labelled)."""
    plt = _pyplot()
    if not rows:
        raise ValueError("rows is empty: pass the output of bsa_flex.layer_stats(...)")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows)), 3.2))
    ax.bar([row["layer"] for row in rows], [row["sparsity"] for row in rows], color="tab:blue")
    for row in rows:
        if row["dense"]:
            ax.text(row["layer"], 0.02, "dense", ha="center", va="bottom", rotation=90, fontsize=8, color="grey")
    ax.set(xlabel="layer", ylabel="sparsity", ylim=(0, 1), title="achieved sparsity per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_figures(out: str, video_shape=(8, 32, 32), config=None, *, heads: int = 4, head_dim: int = 64,
                   layers: int = 6, seed: int = 0) -> list[str]:
    """The three pictures for one synthetic clip, written under ``out``; returns their paths.

    Kept queries and KV blocks of one ``bsa_flex.attention`` call on video-like q/k/v; sparsity
    per layer of a stack of random ``BSAttention`` layers (the first dense, the KV threshold
    rising with depth) run on video-like tokens.
    """
    config = BSAConfig() if config is None else config
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out={out!r} is an existing file, not a folder: name a folder for the pictures")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise ValueError(f"out={out!r} cannot be created as a folder ({error.strerror})") from None
    q, k, v = video_qkv(1, heads, heads, video_shape, head_dim, seed=seed, sharpness=2.0, noise=0.1)
    with torch.no_grad():
        _, stats = attention(q, k, v, video_shape, config, return_stats=True)
    paths = [plot_kept_queries(stats, video_shape, os.path.join(out, "kept_queries.png")),
             plot_kv_blocks(stats, os.path.join(out, "kv_blocks.png"), heads=tuple(range(min(heads, 2))))]

    torch.manual_seed(seed)
    stack = [BSAttention(heads * head_dim, heads, bsa=config, rope=rope_3d) for _ in range(layers)]
    schedule = SparsitySchedule(final_keep_ratio=config.query_keep_ratio, final_kv_threshold=0.8, dense_layers=1,
                                layer_overrides={i: {"final_kv_threshold": min(1.0, 0.8 + 0.04 * i)}
                                                 for i in range(layers)})
    schedule.apply(stack, step=0)
    x = _tokens_from_heads(q)
    with torch.no_grad():
        for layer in stack:
            x = x + layer(x, video_shape)
    paths.append(plot_sparsity_per_layer(layer_stats(stack), os.path.join(out, "sparsity_per_layer.png")))
    return paths


def _tokens_from_heads(q: torch.Tensor) -> torch.Tensor:
    """Video-like tokens [B, S, H*D] from video-like per-head features [B, H, S, D]."""
    B, H, S, D = q.shape
    return q.transpose(1, 2).reshape(B, S, H * D) / math.sqrt(H)
