"""``BSAttention``: the self-attention of a video DiT block, sparse (BSA) or dense by setting."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import TOKEN_ORDERS, attention
from .config import BSAConfig, keep_count
from .order import tile_positions
from .schedule import LayerSparsity
from .validation import check_choice, check_real, check_text_tokens, check_triple, check_video_shape, is_integer

__all__ = ["BSAttention", "SparsityControl", "LayerStats", "rope_3d", "layer_stats"]


class LayerStats(NamedTuple):
    """What one layer's last forward computed; 0-dim tensors on the device (no host sync)."""

    sparsity: torch.Tensor
    kept_query_fraction: torch.Tensor


def _rope_angles(n: int, dims: int, base: float, device) -> torch.Tensor:
    """[n, dims/2] rotation angles of positions 0..n-1 for ``dims`` rotary channels."""
    inv_freq = base ** (-torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims)
    return torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq


def rope_3d(q: torch.Tensor, k: torch.Tensor, video_shape, base: float = 10000.0, *,
            positions: torch.Tensor | None = None):
    """3D rotary embedding of q and k [B, H, S, D] over raster (t, h, w) positions.

    The head dim is split as in Wan2.1: D - 4*(D//6) channels rotate with t, 2*(D//6) with h
    and 2*(D//6) with w (interleaved pairs). A ready-made ``rope`` hook for :class:`BSAttention`.
    ``positions`` [S] int64: the raster index of the token at each of the S places (tokens kept
    in another order, e.g. ``tile_order(...).to_tile``); None: raster order.
    """
    D = q.shape[-1]
    if D % 2 or D < 6:
        raise ValueError(f"rope_3d needs an even head dim >= 6, got {D}")
    spatial = 2 * (D // 6)
    T, Hh, W = video_shape
    angles_t = _rope_angles(T, D - 2 * spatial, base, q.device)[:, None, None, :].expand(T, Hh, W, -1)
    angles_h = _rope_angles(Hh, spatial, base, q.device)[None, :, None, :].expand(T, Hh, W, -1)
    angles_w = _rope_angles(W, spatial, base, q.device)[None, None, :, :].expand(T, Hh, W, -1)
    angles = torch.cat([angles_t, angles_h, angles_w], -1).reshape(T * Hh * W, D // 2)
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.shape != (T * Hh * W,) or positions.is_floating_point():
            raise ValueError(f"rope_3d positions must be an integer tensor of shape [{T * Hh * W}] (one raster index "
                             f"per token), got {getattr(positions, 'shape', type(positions).__name__)}")
        angles = angles[positions]
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):
        pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2)
        even, odd = pairs.unbind(-1)
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1)
        return rearrange(rotated, "... d two -> ... (d two)").to(x.dtype)

    return rotate(q), rotate(k)


class SparsityControl:
    """One attention layer's BSA setting, as a schedule steps it: dense, or a config at a window and kept count.

    The KV threshold is one float32 tensor owned here and updated in place, so a compiled model
    never recompiles for it; the keep ratio is rounded to a whole number of kept queries per
    window, with one config object per (window, count, KV budget) (each, and the dense mode,
    compiles once).
    """

    def __init__(self, bsa: BSAConfig | None):
        if bsa is not None and not isinstance(bsa, BSAConfig):
            raise TypeError(f"bsa must be a BSAConfig or None, got {type(bsa).__name__}")
        self.bsa = bsa
        self.dense = bsa is None
        self.last_stats: LayerStats | None = None
        if bsa is not None:
            self.threshold = torch.tensor(float(bsa.kv_threshold), dtype=torch.float32)
            self._configs: dict[tuple, BSAConfig] = {}
            self._config = self._config_for(bsa.window, bsa.keep_per_window, bsa.kv_budget)

    def _config_for(self, window: tuple[int, int, int], kept_per_window: int, kv_budget: float | None) -> BSAConfig:
        key = window, kept_per_window, kv_budget
        if key not in self._configs:
            ratio = kept_per_window / math.prod(window)
            self._configs[key] = dataclasses.replace(self.bsa, window=window, query_keep_ratio=ratio,
                                                     kv_threshold=self.threshold, kv_budget=kv_budget)
        return self._configs[key]

    @property
    def config(self) -> BSAConfig | None:
        """The BSA config the next call uses (None when dense)."""
        return None if self.dense else self._config

    def to(self, device) -> None:
        """Move the threshold (kept float32) and rebind the configs to it."""
        if self.bsa is not None and self.threshold.device != torch.device(device):
            config = self._config
            self.threshold = self.threshold.to(device)
            self._configs = {}
            self._config = self._config_for(config.window, config.keep_per_window, config.kv_budget)

    def set_sparsity(self, setting: LayerSparsity) -> None:
        """Dense, or BSA at a window (None: the layer's), a keep ratio (rounded to whole kept queries per
        window), a KV threshold and a KV budget (None: the layer's). A window that does not divide the
        layer's tile, or a budget on a layer capped by ``max_kv_blocks``, is a ValueError."""
        if setting.dense:
            self.dense = True
            return
        if self.bsa is None:
            raise ValueError("this layer was built with bsa=None (always dense): pass a BSAConfig to make it sparse")
        if self.bsa.kv_rule != "cumulative":
            raise ValueError(f"the schedule sets kv_threshold, which kv_rule={self.bsa.kv_rule!r} does not use: "
                             f"build the layer with kv_rule='cumulative'")
        for name in ("keep_ratio", "kv_threshold", "kv_budget"):
            if getattr(setting, name) is not None:
                check_real(f"LayerSparsity.{name}", getattr(setting, name), 0.0, 1.0, low_open=True)
        budget = self.bsa.kv_budget if setting.kv_budget is None else setting.kv_budget
        if budget is not None and self.bsa.max_kv_blocks is not None:
            raise ValueError(f"kv_budget {budget}: this layer caps its KV blocks with max_kv_blocks="
                             f"{self.bsa.max_kv_blocks}; build it with kv_budget instead to let a schedule set it")
        window = self.bsa.window if setting.window is None else check_triple("window", setting.window)
        if any(t % w for t, w in zip(self.bsa.tile, window)):
            raise ValueError(f"window {window} must divide this layer's tile {self.bsa.tile} on every axis")
        self.dense = False
        self._config = self._config_for(window, keep_count(setting.keep_ratio, math.prod(window)), budget)
        self.threshold.fill_(setting.kv_threshold)

    def attention(self, q, k, v, video_shape, *, token_order: str = "raster",
                  text_tokens: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """[B, Hq, S, D] attention as set (SDPA when dense, else BSA); records ``last_stats``.
        Dense attention is the same in any token order; BSA is told which order q, k, v are in and how
        many non-video tokens (prefix, suffix) the sequence holds."""
        gqa = q.shape[1] != k.shape[1]
        if self.dense:
            self.last_stats = None
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        out, stats = attention(q, k, v, video_shape, self._config, enable_gqa=gqa, token_order=token_order,
                               prefix_tokens=text_tokens[0], suffix_tokens=text_tokens[1], return_stats=True)
        self.last_stats = LayerStats(stats.sparsity.detach(), stats.kept_query_fraction.detach())
        return out


class BSAttention(nn.Module):
    """Self-attention over a video's tokens: qkv projection, optional q/k RMSNorm, rope, BSA or dense.

    x: [B, S, dim] with S = T*H*W tokens in raster order; ``forward(x, video_shape)`` returns
    [B, S, dim]. Joint attention (e.g. text or register tokens beside the video): ``forward(x, video_shape,
    prefix_tokens=P, suffix_tokens=Q)`` with S = P + T*H*W + Q; the non-video tokens attend to every key
    and every query attends to them (see :func:`bsa_flex.attention`); the rope hook rotates the video
    tokens only. ``token_order="tile"``: x comes and returns in the tile order of
    ``bsa_flex.tile_order(video_shape, bsa)`` (permute once after patchify, back once before
    unpatchify); the rope hook is then called with ``positions=`` the raster index of each token
    (as :func:`rope_3d` takes it), and the layer's window is fixed (the order depends on it).
    ``bsa`` is the layer's BSA configuration (``None``: always dense, through
    ``F.scaled_dot_product_attention``). ``kv_heads`` < ``heads`` is grouped-query attention.
    ``rope`` is None or a callable ``(q, k, video_shape) -> (q, k)``, e.g. :func:`rope_3d`.

    :meth:`set_sparsity` switches between dense and BSA and sets the query keep ratio, the
    KV threshold and the KV budget (what :class:`SparsitySchedule` calls each step; see
    :class:`SparsityControl` for what recompiles). After each BSA forward, ``last_stats`` holds the achieved sparsity
    and kept-query fraction as device tensors.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qk_norm: bool = True, bsa: BSAConfig | None = None, rope: Callable | None = None,
                 bias: bool = True, token_order: str = "raster"):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"BSAttention {name} must be a positive int, got {value!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        if not is_integer(kv_heads) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"BSAttention kv_heads must be a positive int dividing heads={heads}, got {kv_heads!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"BSAttention dim={dim} is not divisible by heads={heads}: pass head_dim")
            head_dim = dim // heads
        if rope is not None and not callable(rope):
            raise TypeError("BSAttention rope must be None or a callable (q, k, video_shape) -> (q, k)")
        check_choice("token_order", token_order, TOKEN_ORDERS)
        if token_order == "tile" and bsa is None:
            raise ValueError("BSAttention token_order='tile' needs bsa (a BSAConfig): its tile and window define the order")
        self.token_order = token_order
        self.sparsity = SparsityControl(bsa)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out = nn.Linear(heads * head_dim, dim, bias=bias)
        self.rope = rope

    def _apply(self, fn, recurse=True):
        """Move the threshold with the parameters, kept float32 whatever dtype the model takes."""
        module = super()._apply(fn, recurse)
        self.sparsity.to(self.qkv.weight.device)
        return module

    @property
    def config(self) -> BSAConfig | None:
        """The BSA config the next forward uses (None when dense)."""
        return self.sparsity.config

    @property
    def last_stats(self) -> LayerStats | None:
        return self.sparsity.last_stats

    def set_sparsity(self, setting: LayerSparsity) -> None:
        """See :meth:`SparsityControl.set_sparsity`; in the tile order the window cannot change."""
        tiled = self.token_order == "tile"  # then bsa is set (the constructor checks it)
        if tiled and setting.window is not None and tuple(setting.window) != self.sparsity.bsa.window:
            raise ValueError(f"window {tuple(setting.window)}: this layer keeps its tokens in the tile order of window "
                             f"{self.sparsity.bsa.window}, which another window would misread; use token_order='raster'")
        self.sparsity.set_sparsity(setting)

    def project(self, x: torch.Tensor, video_shape, text_tokens: tuple[int, int] = (0, 0)
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, dim] -> the attention's q [B, Hq, S, D], k and v [B, Hkv, S, D] (normed, the video's rotated)."""
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = self.q_norm(rearrange(q, "b s (h d) -> b h s d", d=self.head_dim))
        k = self.k_norm(rearrange(k, "b s (h d) -> b h s d", d=self.head_dim))
        v = rearrange(v, "b s (h d) -> b h s d", d=self.head_dim)
        if self.rope is not None:
            q, k = self._rotate_video(q, k, video_shape, text_tokens)
        return q.to(v.dtype), k.to(v.dtype), v  # CUDA autocast may run the norms in float32

    def _rotate_video(self, q, k, video_shape, text_tokens: tuple[int, int]):
        """q, k with the rope hook applied to the video tokens; non-video tokens keep no position."""
        prefix, suffix = text_tokens
        tiled = self.token_order == "tile"  # the tile order puts the non-video tokens after the video
        start = 0 if tiled else prefix
        video = slice(start, q.shape[2] - (prefix + suffix if tiled else suffix))
        kwargs = {}
        if tiled:
            bsa = self.sparsity.bsa
            kwargs["positions"] = tile_positions(check_triple("video_shape", video_shape), bsa.tile, bsa.window,
                                                 bsa.block_size, q.device)
        if prefix + suffix == 0:
            return self.rope(q, k, video_shape, **kwargs)
        q_video, k_video = self.rope(q[:, :, video], k[:, :, video], video_shape, **kwargs)

        def put_back(x, x_video):
            return torch.cat([x[:, :, :video.start], x_video.to(x.dtype), x[:, :, video.stop:]], 2)
        return put_back(q, q_video), put_back(k, k_video)

    def forward(self, x: torch.Tensor, video_shape, *, prefix_tokens: int = 0, suffix_tokens: int = 0) -> torch.Tensor:
        text = check_text_tokens(prefix_tokens, suffix_tokens)
        if x.ndim != 3:
            raise ValueError(f"BSAttention x must be [B, prefix_tokens + T*H*W + suffix_tokens, dim], "
                             f"got {tuple(x.shape)}")
        check_video_shape(video_shape, x.shape[1], text, sequence="x")
        out = self.sparsity.attention(*self.project(x, video_shape, text), video_shape, token_order=self.token_order,
                                      text_tokens=text)
        return self.out(rearrange(out, "b h s d -> b s (h d)"))


def layer_stats(layers: Iterable) -> list[dict]:
    """Per layer (anything with ``last_stats``): dense flag, sparsity and kept-query fraction of its last call (one host sync)."""
    layers = list(layers)
    measured = [layer.last_stats for layer in layers if layer.last_stats is not None]
    host = torch.stack([torch.stack([s.sparsity.float(), s.kept_query_fraction.float()])
                        for s in measured]).tolist() if measured else []
    rows, values = [], iter(host)
    for index, layer in enumerate(layers):
        sparsity, kept = (0.0, 1.0) if layer.last_stats is None else next(values)
        rows.append({"layer": index, "dense": layer.last_stats is None, "sparsity": sparsity,
                     "kept_query_fraction": kept})
    return rows
