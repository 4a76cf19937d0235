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


@torch.library.custom_op("bsa_masks::stable_argsort", mutates_args=())
def _stable_argsort(x: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.argsort(x.contiguous(), dim=-1, descending=descending, stable=True)


@_stable_argsort.register_fake
def _(x: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int64, device=x.device)


def stable_argsort(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Indices [..., n] (int64) that sort ``x`` along its last dim; ties keep their order."""
    return _stable_argsort(x.detach(), descending)
