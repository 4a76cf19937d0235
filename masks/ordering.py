"""Stable argsort as an op the compiler does not look into.

Inductor lowers a sort of up to 512 elements to a Triton bitonic-sort kernel whose compile
time explodes with the length: measured for our graph at 16,384 tokens (torch 2.11, Triton
3.6, sm_90), a 128-element sort took 113-137 s to compile, a 64-element one 16 s, an 8-element
one 1 s (pytorch/pytorch#182060). Every BSA graph sorts KV blocks, so every new shape or kept
count cost minutes. Hidden in a custom op, the sort runs as ATen's sort kernel instead: no
Triton compile, and the same result.
"""
from __future__ import annotations

import torch

__all__ = ["stable_argsort"]


# Declared with torch.library.Library rather than torch.library.custom_op: the dispatcher then
# calls the kernel directly, without custom_op's Python autograd wrapper (about 40 us of host
# time per call on our 2-core CPU, five calls per BSA call). Indices have no gradient.
_LIB = torch.library.Library("bsa_masks", "DEF")
_LIB.define("stable_argsort(Tensor x, bool descending) -> Tensor")


def _stable_argsort(x: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.argsort(x.contiguous(), dim=-1, descending=descending, stable=True)


_LIB.impl("stable_argsort", _stable_argsort, "CompositeExplicitAutograd")


@torch.library.register_fake("bsa_masks::stable_argsort")
def _(x: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int64, device=x.device)


def stable_argsort(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Indices [..., n] (int64) that sort ``x`` along its last dim; ties keep their order."""
    return torch.ops.bsa_masks.stable_argsort(x.detach(), descending)
