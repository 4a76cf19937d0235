"""Stable argsort, and the prefix count of the stream compaction, as ops the compiler does not look into.

Inductor lowers a sort of up to 512 elements to a Triton bitonic-sort kernel whose compile
time explodes with the length: measured for our graph at 16,384 tokens (torch 2.11, Triton
3.6, sm_90), a 128-element sort took 113-137 s to compile, a 64-element one 16 s, an 8-element
one 1 s (pytorch/pytorch#182060). Every BSA graph sorts KV blocks, so every new shape or kept
count cost minutes. Hidden in a custom op, the sort runs as ATen's sort kernel instead: no
Triton compile, and the same result.
"""
from __future__ import annotations

import torch

__all__ = ["stable_argsort", "selected_first", "stable_ranks"]


# Declared with torch.library.Library rather than torch.library.custom_op: the dispatcher then
# calls the kernel directly, without custom_op's Python autograd wrapper (about 40 us of host
# time per call on our 2-core CPU, five calls per BSA call). Indices have no gradient.
_LIB = torch.library.Library("bsa_masks", "DEF")
_LIB.define("stable_argsort(Tensor x, bool descending) -> Tensor")
_LIB.define("selected_upto(Tensor x) -> Tensor")


def _stable_argsort(x: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.argsort(x.contiguous(), dim=-1, descending=descending, stable=True)


_LIB.impl("stable_argsort", _stable_argsort, "CompositeExplicitAutograd")


@torch.library.register_fake("bsa_masks::stable_argsort")
def _(x: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int64, device=x.device)


# The prefix sum is ATen's scan, not Inductor's: a scan Inductor generated failed at one shape
# (torch 2.11). Everything around it stays in the graph, where it fuses.
def _selected_upto(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().cumsum(-1, dtype=torch.int32)


_LIB.impl("selected_upto", _selected_upto, "CompositeExplicitAutograd")


@torch.library.register_fake("bsa_masks::selected_upto")
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int32, device=x.device)


def stable_argsort(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Indices [..., n] (int64) that sort ``x`` along its last dim; ties keep their order."""
    return torch.ops.bsa_masks.stable_argsort(x.detach(), descending)


def selected_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many entries of x [..., n] are nonzero ([...], int32), and the indices [..., n] (int32)
    of the nonzero entries in order, then of the zero ones in order.

    The indices equal ``stable_argsort(x != 0, descending=True)``, but by a stream compaction:
    a prefix sum gives every selected entry its slot and every other entry its slot after them,
    one scatter writes the positions there. Linear in n, no sort.
    """
    selected = (x.detach() != 0).contiguous()
    upto = torch.ops.bsa_masks.selected_upto(selected)  # [..., n]: selected entries up to each
    count = upto[..., -1].contiguous()  # a list of its own, as Flex's num_blocks are
    position = torch.arange(x.shape[-1], device=x.device, dtype=torch.int32)
    slot = torch.where(selected, upto - 1, count[..., None] + position - upto)
    order = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    return count, order.scatter_(-1, slot.long(), position.expand(x.shape))


def stable_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank [..., n] (int64) of each entry of x in a stable ascending sort along the last dim, NaN last.

    ``stable_ranks(x).argsort(-1)`` equals ``stable_argsort(x)``. By pairwise comparison: for the
    few entries of a query window (8) this is a fused elementwise kernel where a sort is not.
    """
    x = x.detach()
    mine, other = x[..., :, None], x[..., None, :]
    index = torch.arange(x.shape[-1], device=x.device)
    other_is_earlier = index[None, :] < index[:, None]
    mine_nan, other_nan = mine.isnan(), other.isnan()
    ordered = mine_nan | (other < mine) | ((other == mine) & other_is_earlier)
    precedes = torch.where(other_nan, mine_nan & other_is_earlier, ordered)
    return precedes.sum(-1)
