"""Property-testing tools for users of bsa_flex: hypothesis strategies, selection invariants
and an oracle comparison, the same ones our own suite uses. This passes as a test file of its own:

    from hypothesis import given, settings
    from bsa_flex.testing import assert_matches_oracle, attention_inputs, configs

    @settings(deadline=None, max_examples=20)  # a new shape may compile: no per-example deadline
    @given(attention_inputs(requires_grad=True), configs())
    def test_bsa_equals_the_oracle_forward_and_backward(inputs, config):
        assert_matches_oracle(*inputs.qkv, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                              check_grads=True)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

try:
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("bsa_flex.testing needs hypothesis: pip install 'bsa-flex[test]'") from error

from masks import FILL_POLICIES, KV_RULES, Selection, TileLayout, local_query_rows, reference_attention

from .attention import attention
from .config import BSAConfig
from .stats import BSAStats
from .synthetic import video_qkv

__all__ = ["AttentionInputs", "video_shapes", "configs", "attention_inputs", "tolerances",
           "check_selection", "relative_error", "assert_matches_oracle"]


class AttentionInputs(NamedTuple):
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    video_shape: tuple[int, int, int]
    enable_gqa: bool
    text_tokens: tuple[int, int] = (0, 0)  # non-video tokens before and after the video


@st.composite
def video_shapes(draw, max_side: int = 9, max_tokens: int = 320) -> tuple[int, int, int]:
    """(T, H, W) with sides in 1..max_side and at most max_tokens tokens (odd sides welcome)."""
    t = draw(st.integers(1, max_side))
    h = draw(st.integers(1, max(1, min(max_side, max_tokens // t))))
    w = draw(st.integers(1, max(1, min(max_side, max_tokens // (t * h)))))
    return (t, h, w)


@st.composite
def configs(draw, block_sizes=(16, 32), max_tile_side: int = 4) -> BSAConfig:
    """Any valid BSAConfig over small tiles: every rule, fill policy, keep ratio and threshold."""
    tile = tuple(draw(st.integers(1, max_tile_side)) for _ in range(3))
    window = tuple(draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in tile)
    return BSAConfig(
        query_keep_ratio=draw(st.sampled_from([0.125, 0.25, 0.5, 0.75, 1.0]) | st.floats(0.05, 1.0)),
        kv_threshold=draw(st.floats(0.05, 1.0)),
        tile=tile, window=window,
        min_kv_blocks=(min_blocks := draw(st.integers(0, 3))),
        max_kv_blocks=(cap := draw(st.none() | st.integers(1, 4))),
        kv_budget=draw(st.none() | st.floats(0.05, 1.0)) if cap is None else None,
        kv_rule=draw(st.sampled_from(KV_RULES)),
        kv_zscore=draw(st.floats(-1.0, 3.0)),
        fill=(fill := draw(st.sampled_from(FILL_POLICIES))),
        local_extra_kv_blocks=draw(st.integers(0, 3)) if fill == "local" else 0,
        force_own_kv_blocks=min_blocks == 0 or draw(st.booleans()),
        block_size=draw(st.sampled_from(block_sizes)),
    )


@st.composite
def attention_inputs(draw, *, shapes=None, dtypes=(torch.float32,), head_dims=(16, 32, 64, 128),
                     max_batch: int = 2, max_kv_heads: int = 2, max_group: int = 3, device="cpu",
                     requires_grad: bool = False, max_text_tokens: int = 0) -> AttentionInputs:
    """q, k, v (video-like or i.i.d. noise, GQA or not) for a drawn video shape.

    With ``max_text_tokens`` > 0, up to that many non-video tokens (i.i.d. noise, like text
    embeddings) are drawn before and after the video; ``text_tokens`` says how many.
    """
    video_shape = draw(shapes if shapes is not None else video_shapes())
    kv_heads = draw(st.integers(1, max_kv_heads))
    group = draw(st.integers(1, max_group))
    dtype = draw(st.sampled_from(dtypes))
    kwargs = dict(dtype=dtype, device=device, seed=draw(st.integers(0, 2**31 - 1)), requires_grad=requires_grad)
    if draw(st.booleans()):  # structured like video, with varying smoothness and sharpness
        kwargs.update(noise=draw(st.floats(0.0, 1.0)), sharpness=draw(st.floats(0.5, 16.0)),
                      frequency=draw(st.floats(0.2, 4.0)))
    else:  # pure noise
        kwargs.update(noise=1.0, sharpness=1.0, frequency=0.0)
    qkv = video_qkv(draw(st.integers(1, max_batch)), kv_heads * group, kv_heads, video_shape,
                    draw(st.sampled_from(head_dims)), **{**kwargs, "requires_grad": False})
    text = (draw(st.integers(0, max_text_tokens)), draw(st.integers(0, max_text_tokens)))
    if text != (0, 0):
        g = torch.Generator().manual_seed(kwargs["seed"] + 1)

        def around(x):
            before, after = (torch.randn(*x.shape[:2], n, x.shape[3], generator=g).to(x) for n in text)
            return torch.cat([before, x, after], 2)
        qkv = tuple(around(x) for x in qkv)
    qkv = tuple(x.requires_grad_(requires_grad) for x in qkv)
    return AttentionInputs(qkv, video_shape, group > 1, text)


def tolerances(dtype: torch.dtype, device: torch.device) -> dict:
    """assert_close tolerances against the float64 oracle for outputs of this dtype."""
    if dtype == torch.float32:  # CUDA matmuls may run in TF32
        tol = 2e-3 if torch.device(device).type == "cuda" else 1e-4
    else:
        tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    return dict(atol=tol, rtol=tol)


def check_selection(selection: Selection, layout: TileLayout, config: BSAConfig) -> None:
    """Assert the invariants every BSA selection must satisfy (AssertionError says which)."""
    B, H, Nq = selection.kept_token.shape
    assert Nq % layout.block_size == 0 and selection.kv_blocks.shape == (
        B, H, Nq // layout.block_size, layout.num_kv_blocks), "shapes"
    local_rows = local_query_rows(layout, config.keep_per_window, config.fill)
    local_row = selection.local_row
    assert int(local_row.sum(-1).max()) == int(local_row.sum(-1).min()) == local_rows, "local rows"
    assert not bool(local_row[..., :Nq - local_rows].any()), "a local row before the kept and non-video rows"
    is_kept = _check_kept_queries(selection, layout, config)
    _check_fill(selection, layout, is_kept, local_rows)
    _check_kv_blocks(selection, layout)
    if local_rows:
        _check_local_rows(selection, layout, config, local_rows)


def _video_windows(layout: TileLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """[S] bool: the token is a video token; [S]: a video token's window (0 for the others)."""
    is_video = layout.token_slot < layout.num_video_slots
    return is_video, torch.where(is_video, layout.token_slot // layout.window_tokens, 0)


def _check_kept_queries(selection: Selection, layout: TileLayout, config: BSAConfig) -> torch.Tensor:
    """Kept queries are distinct real tokens, per window min(keep, real tokens) of them incl. the centre;
    every non-video token is kept. Returns [B, H, S] bool: the token is a kept query."""
    kept_token = selection.kept_token
    B, H, _ = kept_token.shape
    S = layout.num_tokens
    is_video, window = _video_windows(layout)
    kept = selection.kept_valid & ~selection.local_row
    counts = torch.zeros(B, H, layout.num_windows, dtype=torch.int64, device=kept_token.device)
    kept_video = kept & is_video[kept_token]
    counts.scatter_add_(2, window[kept_token] * kept_video, kept_video.long())
    real = torch.bincount(window[is_video], minlength=layout.num_windows)
    assert torch.equal(counts, real.clamp_max(config.keep_per_window).expand_as(counts)), "kept counts per window"
    marks = torch.zeros(B, H, S + 1, dtype=torch.int64, device=kept_token.device)
    marks.scatter_add_(2, torch.where(kept, kept_token, S), torch.ones_like(kept_token))
    assert int(marks[..., :S].max()) <= 1, "a token is kept twice"
    anchor_token = layout.slot_token[torch.arange(layout.num_windows, device=window.device) * layout.window_tokens
                                     + layout.window_anchor]
    assert bool((marks[..., anchor_token[real > 0]] == 1).all()), "a window's centre token was pruned"
    assert bool(marks[..., :S][..., ~is_video].eq(1).all()), "a non-video token was pruned"
    return marks[..., :S] == 1


def _check_fill(selection: Selection, layout: TileLayout, is_kept: torch.Tensor, local_rows: int) -> None:
    """Kept tokens take their own row; pruned ones a real kept row of their own window, or (fill "local") a
    local row of their own."""
    kept_token, kept_valid, fill_source = selection.kept_token, selection.kept_valid, selection.fill_source
    is_video, window = _video_windows(layout)
    source_token = kept_token.gather(2, fill_source)
    assert bool(kept_valid.gather(2, fill_source).all()), "a token copies a padding row"
    own = source_token == torch.arange(layout.num_tokens, device=kept_token.device)
    assert bool(own[is_kept].all()), "a kept token does not take its own output"
    assert bool((window[source_token] == window)[..., is_video].all()), "a token copies from another window"
    takes_local = selection.local_row.gather(2, fill_source)
    assert torch.equal(takes_local, ~is_kept if local_rows else torch.zeros_like(is_kept)), \
        "a pruned token does not take a local row, or a kept one does"
    assert bool(own[takes_local].all()), "a local row is taken by another token"


def _check_kv_blocks(selection: Selection, layout: TileLayout) -> None:
    """KV blocks: never padding-only, never empty for a query block holding a real query; every query
    attends to all non-video tokens, and non-video queries to every key."""
    kept_token, kept_valid, kv_blocks = selection.kept_token, selection.kept_valid, selection.kv_blocks
    B, H, _ = kept_token.shape
    is_video, _ = _video_windows(layout)
    assert not bool((kv_blocks & ~layout.kv_block_valid).any()), "a padding-only KV block was selected"
    has_query = kept_valid.view(B, H, -1, layout.block_size).any(-1)
    assert bool(kv_blocks.any(-1)[has_query].all()), "a query block has no KV block"
    assert bool(kv_blocks[has_query][:, layout.kv_block_text].all()), "a query block skips a non-video KV block"
    text_query = (kept_valid & ~is_video[kept_token]).view(B, H, -1, layout.block_size).any(-1)
    assert bool((kv_blocks[text_query] == layout.kv_block_valid).all()), "a non-video query skips a KV block"


def _check_local_rows(selection: Selection, layout: TileLayout, config: BSAConfig, local_rows: int) -> None:
    """Local rows list the pruned queries window by window, each block attending its tiles' KV blocks and the
    non-video ones, and exactly ``local_extra_kv_blocks`` other video blocks (or all there are)."""
    Nq, bs = selection.kept_token.shape[-1], layout.block_size
    _, window = _video_windows(layout)
    pruned_per_window = layout.window_tokens - config.keep_per_window
    row_window = (torch.arange(local_rows, device=window.device) // pruned_per_window).clamp_max(
        layout.num_windows - 1)
    tokens, valid = selection.kept_token[..., Nq - local_rows:], selection.kept_valid[..., Nq - local_rows:]
    assert bool((window[tokens] == row_window)[valid].all()), "a local row holds a token of another window"
    tile_start = row_window // layout.windows_per_tile * layout.tile_tokens
    first = (tile_start // bs).view(-1, bs).amin(-1, keepdim=True)
    last = ((tile_start + layout.tile_tokens - 1) // bs).view(-1, bs).amax(-1, keepdim=True)
    kv = torch.arange(layout.num_kv_blocks, device=window.device)
    own = (kv >= first) & (kv <= last) & layout.kv_block_valid | layout.kv_block_text
    local = selection.kv_blocks[..., (Nq - local_rows) // bs:, :]
    assert bool((local | ~own).all()), "a local row skips one of its own tiles' KV blocks"
    extra = local & ~own
    assert not bool((extra & ~layout.kv_block_video).any()), "a local row's extra KV block is not a video block"
    others = (layout.kv_block_video & ~own).sum(-1)
    assert torch.equal(extra.sum(-1), others.clamp_max(config.local_extra_kv_blocks).expand_as(extra.sum(-1))), \
        "a local row block does not attend local_extra_kv_blocks more KV blocks than its own tiles'"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with ||b|| floored at an RMS of 1e-3: a saturated softmax has a
    near-zero dq, where a relative error would only measure float32 rounding."""
    floor = 1e-3 * b.numel() ** 0.5
    return float((a.double() - b).norm() / b.norm().clamp_min(floor))


def assert_matches_oracle(q, k, v, video_shape, config: BSAConfig | None = None, *, scale=None,
                          enable_gqa: bool = False, score_mod: Callable | None = None,
                          text_tokens: tuple[int, int] = (0, 0),
                          check_grads: bool = False, grad_tol: float | None = None,
                          attention_fn: Callable = attention) -> BSAStats:
    """Run ``bsa_flex.attention`` and assert it equals the float64 oracle on the same selection.

    ``attention_fn``: the function under test, called like ``bsa_flex.attention`` (e.g. a
    ``torch.compile`` of it, which inlines BSA into the caller's graph).
    Compares the output (and the LSE where the path returns one) element-wise with
    :func:`tolerances`, checks :func:`check_selection`, and with ``check_grads`` compares the
    gradients of q, k and v for a random output gradient by relative L2 error (``grad_tol``,
    default 5e-3 for float32: float32 SDPA itself reaches 7e-4 against float64 on saturated
    softmax rows; 3e-2 for half types). Selection or fill bugs give errors of order 0.1-1.
    """
    config = BSAConfig() if config is None else config
    leaves = [t.detach().clone().requires_grad_(check_grads) for t in (q, k, v)]
    out, stats = attention_fn(*leaves, video_shape, config, scale=scale, enable_gqa=enable_gqa,
                              score_mod=score_mod, prefix_tokens=text_tokens[0], suffix_tokens=text_tokens[1],
                              return_stats=True)
    layout = stats.layout
    assert (layout.video_shape, layout.tile, layout.window, layout.block_size, (layout.num_prefix, layout.num_suffix)) \
        == (tuple(video_shape), config.tile, config.window, config.block_size, tuple(text_tokens)), "stats.layout"
    check_selection(stats.selection, layout, config)
    ref_leaves = [t.detach().double().requires_grad_(check_grads) for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref_leaves, stats.selection, layout,
                                           scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                           score_mod=score_mod, zero_pruned=config.fill == "none")
    tol = tolerances(q.dtype, q.device)
    torch.testing.assert_close(out.double(), ref_out, **tol, msg=lambda m: f"output vs oracle: {m}")
    if stats.lse is not None:
        torch.testing.assert_close(stats.lse.double(), ref_lse, atol=tol["atol"] * 10, rtol=tol["rtol"],
                                   msg=lambda m: f"LSE vs oracle: {m}")
    if check_grads:
        _assert_gradients_match(out, ref_out, leaves, ref_leaves,
                                grad_tol if grad_tol is not None else 3e-2 if q.dtype != torch.float32 else 5e-3)
    return stats


def _assert_gradients_match(out, ref_out, leaves, ref_leaves, grad_tol: float) -> None:
    """Back-propagate one random output gradient through both; compare the q, k, v gradients."""
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    ref_out.backward(grad_out.to(ref_out.device))
    for name, got, ref in zip("qkv", leaves, ref_leaves):
        err = relative_error(got.grad, ref.grad)
        assert err <= grad_tol, f"grad of {name}: relative L2 error {err:.2e} > {grad_tol:.0e}"
