"""Query sparsity: inside every window of a tile keep the centre token and the queries least
similar to it; every pruned query later takes the output of a kept query of its window (or, with
the fill rule "none", the output 0; with "local", it attends to its own tile's KV blocks only)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .layout import TileLayout
from .ordering import stable_ranks

__all__ = ["FILL_POLICIES", "KeptQueries", "select_queries", "video_query_rows", "local_query_rows", "gather_tokens",
           "compact_queries", "to_tile_major", "fill_candidates", "fill_from_kept", "takes_own_output"]

# Which kept query's output a pruned query takes: the most similar one (cosine), the window's
# centre, the nearest in space-time (ties: the earliest kept), or none (the output is 0); or
# "local": none, the pruned query attends to the KV blocks of its own tile instead (a row of its own,
# after the kept and the non-video rows; a query block of pruned rows attends to the KV blocks of every
# tile its rows come from: at 128-token blocks and 4x4x4 tiles with keep 0.5, four tiles, 2 KV blocks).
FILL_POLICIES = ("most_similar", "anchor", "nearest", "none", "local")


class KeptQueries(NamedTuple):
    """The compact query set: the kept video queries, the non-video ones, then (fill "local") the pruned
    video queries, each group padded to whole query blocks of ``block_size``."""

    kept_token: torch.Tensor  # [B, H, Nq] int64: sequence index of each compact query (0 for padding rows)
    kept_valid: torch.Tensor  # [B, H, Nq] bool: the compact row holds a real token
    fill_source: torch.Tensor  # [B, H, N] int64: compact row whose output each token of the sequence takes
    local_row: torch.Tensor  # [B, H, Nq] bool: the row is a pruned query attending its own tile (fill "local")


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x along the sequence: x [B, H, N, D], index [B, H, M] -> [B, H, M, D]."""
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


class _GatherKept(torch.autograd.Function):
    """Row gather whose backward is a gather too: every row of x is taken at most once, so its
    gradient is that of its compact row, or 0; no zero-filled copy of x taking atomic scatter-adds."""

    @staticmethod
    def forward(x, index, row_of, is_taken):
        return gather_tokens(x, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx, grad):
        row_of, is_taken = ctx.saved_tensors
        return torch.where(is_taken[..., None], gather_tokens(grad, row_of), 0.0), None, None, None


def compact_queries(q: torch.Tensor, kept: KeptQueries, layout: TileLayout,
                    in_tile_order: bool = False) -> torch.Tensor:
    """The kept queries, [B, H, S, D] -> [B, H, Nq, D], from q in sequence order (or ``in_tile_order``).

    Padding rows repeat a token and get no gradient (no output row copies them): each token's
    gradient is read from its own compact row, which its fill source names.
    """
    index, row_of, is_taken = kept.kept_token, kept.fill_source, takes_own_output(kept)
    if in_tile_order:
        order = layout.tile_order
        index, row_of, is_taken = layout.tile_position[index], row_of[..., order], is_taken[..., order]
    return _GatherKept.apply(q, index, row_of, is_taken)


class _ToTileMajor(torch.autograd.Function):
    """Slot gather whose backward is a gather too: no atomic index_add.

    Exact because real slots are a bijection onto tokens and the gradient reaching a padding
    slot is zero: padding keys are masked out of every softmax, so they get no gradient.
    """

    @staticmethod
    def forward(x, slot_token, token_slot):
        return x.index_select(2, slot_token)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (token_slot,) = ctx.saved_tensors
        return grad.index_select(2, token_slot), None, None


def to_tile_major(x: torch.Tensor, layout: TileLayout, in_tile_order: bool = False) -> torch.Tensor:
    """[B, H, S, D] in sequence order (or ``in_tile_order``) -> tile-major slots [B, H, n_slots, D].

    Padding slots hold token 0. In tile order without padding slots, x already is the slot order
    and is returned as is (no copy). Only for keys and values: the backward drops the gradient of
    padding slots (zero there).
    """
    if not in_tile_order:
        return _ToTileMajor.apply(x, layout.slot_token, layout.token_slot)
    if layout.num_slots == layout.num_tokens:
        return x
    return _ToTileMajor.apply(x, layout.tile_position[layout.slot_token], layout.token_slot[layout.tile_order])


def fill_candidates(layout: TileLayout, keep_per_window: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster tokens that may copy each compact row, [Nq, c], and which of them are real, [Nq, c] bool.

    A video row is copied only by tokens of its own window (c = w), a non-video row only by its
    own token (in column 0); padding rows by none. With every query kept (k == w) each row is
    copied by its own token alone, so c = 1 and the fill's backward is one gather.
    """
    w, k = layout.window_tokens, keep_per_window
    rows = torch.arange(num_rows, device=layout.slot_token.device)
    if k == w:  # the compact rows are the slots themselves, each copied by its own token alone
        return layout.slot_token[rows, None], layout.slot_valid[rows, None]
    column = torch.arange(w, device=rows.device)
    video_rows = video_query_rows(layout, k)
    is_video = rows < layout.num_windows * k
    is_text = rows >= video_rows
    window_slot = (rows // k).clamp_max(layout.num_windows - 1)[:, None] * w + column
    text_slot = (layout.text_slot_start + rows - video_rows).clamp(0, layout.num_slots - 1)
    slot = torch.where(is_text[:, None], text_slot[:, None], window_slot)
    real = is_video[:, None] | (is_text[:, None] & (column == 0))
    return layout.slot_token[slot], layout.slot_valid[slot] & real


class _FillFromKept(torch.autograd.Function):
    """Fill gather whose backward sums each kept row's copies in (at least) float32, without atomics.

    Autograd's scatter-add would add up to a window's worth of copies per row with atomics in
    the gradient's dtype: in an order that varies from run to run (gradients not bit-reproducible)
    and rounding in bf16 at every addition. Here each row sums its window's tokens that copy it.
    """

    @staticmethod
    def forward(out_kept, fill_source, candidates, candidate_valid):
        return gather_tokens(out_kept, fill_source)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad):
        fill_source, candidates, candidate_valid = ctx.saved_tensors
        rows = torch.arange(candidates.shape[0], device=candidates.device)
        copies = (fill_source[:, :, candidates] == rows[:, None]) & candidate_valid  # [B, H, Nq, w]
        accumulate = torch.promote_types(grad.dtype, torch.float32)
        grad_kept = torch.zeros(*grad.shape[:2], candidates.shape[0], grad.shape[-1], dtype=accumulate,
                                device=grad.device)
        for j in range(candidates.shape[1]):  # candidate by candidate, in order: [B, H, Nq, D] at a time
            grad_kept += grad[:, :, candidates[:, j]].to(accumulate) * copies[..., j, None]
        return grad_kept.to(grad.dtype), None, None, None


def fill_from_kept(out_kept: torch.Tensor, fill_source: torch.Tensor, candidates: torch.Tensor,
                   candidate_valid: torch.Tensor) -> torch.Tensor:
    """Every token's output copied from its kept row: [B, H, Nq, D] -> [B, H, S, D] in raster order.

    The same as ``gather_tokens(out_kept, fill_source)``, with a deterministic backward;
    ``candidates``/``candidate_valid`` [Nq, c] from :func:`fill_candidates` (or ``static_selection``).
    """
    return _FillFromKept.apply(out_kept, fill_source, candidates, candidate_valid)


def takes_own_output(kept: KeptQueries) -> torch.Tensor:
    """[B, H, S] bool: the token is a kept query (its output is its own attention's), not a pruned one."""
    token = torch.arange(kept.fill_source.shape[-1], device=kept.fill_source.device)
    return kept.kept_token.gather(2, kept.fill_source) == token


class WindowQueries(NamedTuple):
    """The video's queries grouped by window, in float32 and detached: what query selection scores."""

    queries: torch.Tensor  # [B, H, n_windows, w, D]
    norm: torch.Tensor  # [B, H, n_windows, w]: their L2 norms, at least 1e-12 (as F.normalize's eps)


def _window_queries(q: torch.Tensor, layout: TileLayout, in_tile_order: bool) -> WindowQueries:
    """The queries of every window and their norms, from q [B, H, S, D] in sequence (or tile) order."""
    slots = layout.slot_token[: layout.num_video_slots]
    rows = layout.tile_position[slots] if in_tile_order else slots
    queries = rearrange(q.detach().index_select(2, rows).float(), "b h (n w) d -> b h n w d", w=layout.window_tokens)
    return WindowQueries(queries, queries.square().sum(-1).sqrt().clamp_min(1e-12))


def _window_rows(queries: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The queries [B, H, n, m, D] at window positions ``position`` [B, H, n, m] of ``queries`` [B, H, n, w, D]."""
    return queries.gather(3, position[..., None].expand(*position.shape, queries.shape[-1]))


def _cosines_to(windows: WindowQueries, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Float32 cosines [B, H, n, r, c] between the queries at window positions ``rows`` [B, H, n, r]
    and those at ``columns`` [B, H, n, c].

    Only the r x c pairs needed are formed (every position against the centre for selection, the
    pruned against the kept for the fill), not the window's w x w matrix, one reduction over D per
    column, fused into one pass (at 153,600 tokens on an H100 the fill's cosines took 0.79 ms for
    all w x k pairs, 0.64 ms for the pruned x kept ones).
    Non-finite cosines are set to 0, so that a head holding NaN or inf still gets a well-formed
    selection (its output is NaN anyway) and finite heads are untouched; a zero query's cosines are 0.
    """
    queries, norm = windows
    mine, mine_norm = _window_rows(queries, rows), norm.gather(3, rows)
    dots = [(mine * _window_rows(queries, columns[..., j:j + 1])).sum(-1) for j in range(columns.shape[-1])]
    norms = mine_norm[..., :, None] * norm.gather(3, columns)[..., None, :]
    return (torch.stack(dots, -1) / norms).nan_to_num(0.0, 0.0, 0.0)


def _keep_order_score(windows: WindowQueries, layout: TileLayout) -> torch.Tensor:
    """[B, H, n, w] sort key: anchor first, then least similar to the anchor, padding last."""
    anchor = layout.window_anchor
    w = layout.window_tokens
    shape = windows.norm.shape
    local = torch.arange(w, device=anchor.device)
    similarity = _cosines_to(windows, local.expand(shape), anchor[:, None].expand(*shape[:3], 1)).squeeze(-1)
    valid = layout.slot_valid[: layout.num_video_slots].view(-1, w)
    score = similarity.masked_fill(~valid, float("inf"))
    return score.masked_fill(local == anchor[:, None], float("-inf"))


def _fill_choice(windows: WindowQueries, pruned_local: torch.Tensor, kept_local: torch.Tensor,
                 kept_valid: torch.Tensor, layout: TileLayout, fill: str) -> torch.Tensor:
    """[B, H, n, w - k] rank (within the window's kept list) of the kept query each pruned query copies.

    The preferred real kept query of its window (ties to the lowest rank): the most similar one
    ("most_similar"), the nearest in space-time ("nearest") or the centre ("anchor"; also the row
    "none" records, whose output is 0 instead).
    """
    if fill == "most_similar":
        preference = _cosines_to(windows, pruned_local, kept_local)
    elif fill == "nearest":
        distance = _window_distances(layout.window, kept_local.device)
        preference = -distance[pruned_local[..., :, None], kept_local[..., None, :]]
    else:
        is_anchor = kept_local == layout.window_anchor[:, None]
        preference = is_anchor.float()[..., None, :].expand(*pruned_local.shape, -1)
    return preference.masked_fill(~kept_valid[..., None, :], float("-inf")).argmax(-1)


def _window_distances(window: tuple[int, int, int], device) -> torch.Tensor:
    """[w, w] float32 squared space-time distances between the positions of a window (raster inside it)."""
    axes = [torch.arange(n, device=device) for n in window]
    position = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).float()
    return (position[:, None] - position[None, :]).square().sum(-1)


def _value_at_positions(position: torch.Tensor, value: torch.Tensor, w: int) -> torch.Tensor:
    """[..., w]: value[..., j] at window position position[..., j], 0 at positions not listed."""
    local = torch.arange(w, device=position.device)
    return ((position[..., None, :] == local[:, None]) * value[..., None, :]).sum(-1)


class KeptInWindows(NamedTuple):
    """Which window positions are kept and pruned, in slot order, and the window queries they were scored on."""

    kept_local: torch.Tensor  # [B, H, n, k]
    pruned_local: torch.Tensor  # [B, H, n, w - k]
    windows: WindowQueries | None  # None with every position kept (nothing scored)


def _kept_in_windows(q: torch.Tensor, layout: TileLayout, k: int, in_tile_order: bool) -> KeptInWindows:
    """The kept and pruned window positions: centre first, then least similar to it.

    With k equal to the window size (keep ratio 1.0) every position is kept and nothing is scored.
    """
    B, H = q.shape[:2]
    n, w = layout.num_windows, layout.window_tokens
    if k == w:
        nothing = torch.empty(B, H, n, 0, dtype=torch.long, device=q.device)
        return KeptInWindows(torch.arange(w, device=q.device).expand(B, H, n, w), nothing, None)
    windows = _window_queries(q, layout, in_tile_order)
    kept = stable_ranks(_keep_order_score(windows, layout)) < k
    return KeptInWindows(_kept_positions(kept, k), _kept_positions(~kept, w - k), windows)


def _kept_positions(kept: torch.Tensor, k: int) -> torch.Tensor:
    """Window positions [..., k] of the k True entries of kept [..., w], in ascending order.

    By pairwise counts (how many kept entries precede each one), not a sort: windows are small.
    """
    w = kept.shape[-1]
    position = torch.arange(w, device=kept.device)
    kept_before = (kept[..., None, :] & (position[None, :] < position[:, None])).sum(-1)  # [..., w]
    is_slot = kept[..., None, :] & (kept_before[..., None, :] == torch.arange(k, device=kept.device)[:, None])
    return (is_slot * position).sum(-1)  # [..., k]: the one position that fills each slot


def video_query_rows(layout: TileLayout, keep_per_window: int) -> int:
    """Compact rows of the video's kept queries: windows x kept per window, padded to whole query blocks."""
    return -(-layout.num_windows * keep_per_window // layout.block_size) * layout.block_size


def local_query_rows(layout: TileLayout, keep_per_window: int, fill: str) -> int:
    """Compact rows of the pruned queries that attend their own tile (fill "local"), padded to whole query
    blocks; 0 for the other fill rules and where every query is kept."""
    if fill != "local" or keep_per_window == layout.window_tokens:
        return 0
    return video_query_rows(layout, layout.window_tokens - keep_per_window)


def _fill_rows(selected: KeptInWindows, kept_valid: torch.Tensor, layout: TileLayout, fill: str,
               local_start: int) -> torch.Tensor:
    """[B, H, n * w]: the compact row whose output each video slot takes, in slot order.

    A kept query takes its own row; a pruned one the row of its fill choice among its window's kept
    queries, or with "local" a row of its own from ``local_start`` on (the pruned queries window by window).
    """
    kept_local, pruned_local, windows = selected
    n, w, k = layout.num_windows, layout.window_tokens, kept_local.shape[-1]
    window_start = torch.arange(n, device=kept_local.device)[:, None]
    if windows is None:  # every position kept: each takes its own row
        return (window_start * k + kept_local).flatten(2)
    kept_rows = window_start * k + torch.arange(k, device=kept_local.device)
    if fill == "local":
        pruned_rows = local_start + window_start * (w - k) + torch.arange(w - k, device=kept_local.device)
    else:
        B, H = kept_local.shape[:2]
        pruned_rows = window_start * k + _fill_choice(windows, pruned_local, kept_local, kept_valid.view(B, H, n, k),
                                                      layout, fill)
    return (_value_at_positions(kept_local, kept_rows.expand_as(kept_local), w)
            + _value_at_positions(pruned_local, pruned_rows.expand_as(pruned_local), w)).flatten(2)


def _window_rows_padded(layout: TileLayout, local: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and validity [B, H, rows] of window positions ``local`` [B, H, n, m], window by window, padded."""
    slot = (torch.arange(layout.num_windows, device=local.device)[:, None] * layout.window_tokens + local).flatten(2)
    pad = rows - slot.shape[-1]
    return F.pad(layout.slot_token[slot], (0, pad)), F.pad(layout.slot_valid[slot], (0, pad))


def select_queries(q: torch.Tensor, layout: TileLayout, keep_per_window: int, fill: str,
                   in_tile_order: bool = False) -> KeptQueries:
    """Select the kept queries of every window and the fill source of every token.

    q: [B, H, S, D] in sequence (raster) order, or ``in_tile_order`` (``layout.tile_order``); the
    result indexes sequence tokens either way. In each window the centre token is kept, then the
    ``keep_per_window - 1`` real tokens least similar (cosine) to it; a stable sort makes ties
    resolve by position, so the choice is the same on every run. Kept queries are listed per
    window in slot order; the compact length is padded to a multiple of ``layout.block_size``.
    Non-video tokens (``layout.num_prefix``/``num_suffix``) are all kept, as the query blocks
    after the video's, in their slot order; each copies itself. With the fill rule "local" the
    pruned video queries follow as rows of their own (window by window), each taking its own output.
    """
    B, H = q.shape[:2]
    k = keep_per_window
    selected = _kept_in_windows(q, layout, k, in_tile_order)
    kept_token, kept_valid = _window_rows_padded(layout, selected.kept_local, video_query_rows(layout, k))
    text_slots = torch.arange(layout.text_slot_start, layout.num_slots, device=q.device)
    local_start = kept_token.shape[-1] + len(text_slots)
    fill_by_slot = _fill_rows(selected, kept_valid[..., :layout.num_windows * k], layout, fill, local_start)
    if len(text_slots):  # non-video tokens: kept rows after the video's
        text_rows = kept_token.shape[-1] + text_slots - layout.text_slot_start
        kept_token = torch.cat([kept_token, layout.slot_token[text_slots].expand(B, H, -1)], 2)
        kept_valid = torch.cat([kept_valid, layout.slot_valid[text_slots].expand(B, H, -1)], 2)
        gap = fill_by_slot.new_zeros(B, H, layout.text_slot_start - fill_by_slot.shape[-1])  # video padding slots
        fill_by_slot = torch.cat([fill_by_slot, gap, text_rows.expand(B, H, -1)], 2)
    local_rows = local_query_rows(layout, k, fill)
    if local_rows:  # the pruned queries' own rows
        local_token, local_valid = _window_rows_padded(layout, selected.pruned_local, local_rows)
        kept_token, kept_valid = torch.cat([kept_token, local_token], 2), torch.cat([kept_valid, local_valid], 2)
    local_row = torch.arange(local_start + local_rows, device=q.device) >= local_start
    return KeptQueries(kept_token=kept_token, kept_valid=kept_valid,
                       fill_source=fill_by_slot.index_select(2, layout.token_slot),
                       local_row=local_row.expand(B, H, -1))
