"""The runtime around the BSA operator: make the plan, compile once per signature, say when a
graph is compiled, and dispatch between the compiled graph, a caller's compiled region and the
eager CPU training path. The operator itself (``bsa_flex.attention``) knows none of this."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from typing import Callable

import torch
from torch._dynamo.comptime import comptime
from torch.fx.experimental.symbolic_shapes import guard_scalar

from masks import StaticSelection, TileLayout, static_selection, tile_layout

from .config import BSAConfig
from .kernels import announce_kernel, choose_kernel, kernel_facts
from .paths import BSAEagerWarning
from .plan import BSAPlan
from .stats import collect_stats

__all__ = ["BSAFullgraphError", "BSARecompileWarning", "compile_static", "make_plan", "run_operator",
           "threshold_tensor"]

log = logging.getLogger("bsa_flex")


class BSARecompileWarning(UserWarning):
    """The compiled BSA graph was compiled again for a signature it had already compiled, or the
    number of compiled graphs approaches the recompile limit."""


def compile_static(fn: Callable) -> Callable:
    """fullgraph, static shapes: a graph break or a dynamic shape would hide a slow path."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


@functools.cache
def _compiled(operator: Callable) -> Callable:
    """The one compiled version of ``operator`` (sparse_attention or a wrapper of it)."""
    return compile_static(operator)


# Each shape, grad mode and kept count is one graph of the same function; dynamo's default budget
# (8 per function) would turn the 9th into a hard error under fullgraph, e.g. in a test suite or
# a schedule with many kept counts. The budget is raised around our own calls only.
_RECOMPILE_LIMIT = 64
_RAISED_RECOMPILE_LIMIT = torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)  # built once: hot path


def _signature(operator: Callable, q, k, v, plan: BSAPlan) -> tuple:
    """What one compiled graph is specialised to: shapes, strides, dtype, device, grad and inference modes, plan constants."""
    config = plan.config
    fields = tuple(getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in ("kv_threshold", "kv_zscore"))  # the thresholds never recompile
    # the layout by identity: dynamo guards on the object, which the layout cache may rebuild
    return (operator, tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), v.stride(), q.dtype, str(q.device),
            tuple(x.requires_grad for x in (q, k, v)), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            q.is_inference(), plan.kernel, id(plan.layout), plan.scale, plan.score_mod, plan.token_order, plan.query_share, fields)


class _GraphLog:
    """The graphs bsa_flex compiled: a new signature is logged; a signature compiled before, or a
    count near the recompile limit, is warned about (the user can act on those)."""

    def __init__(self, limit: int):
        self.limit, self.seen, self.graphs = limit, set(), 0

    @staticmethod
    def unique_graphs() -> int:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]

    def record(self, signature: tuple, description: str) -> None:
        self.graphs += 1
        if signature not in self.seen:
            self.seen.add(signature)
            log.info("bsa_flex: compiled the sparse-attention graph (#%d) for %s", self.graphs, description)
        else:
            warnings.warn(f"bsa_flex: compiled the sparse-attention graph again for a signature it had compiled "
                          f"before ({description}): something outside bsa_flex reset or invalidated torch.compile's "
                          f"caches, or a value that should be a tensor changes between calls", BSARecompileWarning,
                          stacklevel=6)
        if self.graphs == int(0.75 * self.limit):
            warnings.warn(f"bsa_flex: {self.graphs} sparse-attention graphs compiled, near the limit of "
                          f"{self.limit}: each shape, grad mode, kept count per window and structural config "
                          f"compiles one; reuse fewer of them", BSARecompileWarning, stacklevel=6)


_GRAPHS = _GraphLog(_RECOMPILE_LIMIT)


def _run_compiled(operator: Callable, q, k, v, threshold: torch.Tensor, plan: BSAPlan):
    """Run the compiled ``operator``; record each graph that compiled."""
    before = _GRAPHS.unique_graphs()
    raised = torch._dynamo.config.recompile_limit < _RECOMPILE_LIMIT
    with _RAISED_RECOMPILE_LIMIT if raised else contextlib.nullcontext():
        result = _compiled(operator)(q, k, v, threshold, plan)
    if _GRAPHS.unique_graphs() > before:
        _GRAPHS.record(_signature(operator, q, k, v, plan),
                       f"q {tuple(q.shape)} {q.dtype} on {q.device}, k/v {tuple(k.shape)}, "
                       f"requires_grad {_needs_grad(q, k, v)}, kernel {plan.kernel}")
    return result


@torch.compiler.assume_constant_result
def _layout(video_shape, tile, window, block_size: int, device: torch.device, text_tokens) -> TileLayout:
    """The cached tile layout; a constant to torch.compile, which must not trace its numpy code."""
    return tile_layout(video_shape, tile, window, block_size, device, text_tokens)


@torch.compiler.assume_constant_result
def _static(layout_key: tuple, keep_per_window: int, fill: str) -> StaticSelection:
    """The layout's cached index tables for a kept count and fill rule; a constant to torch.compile (whose
    constant functions take plain values, hence the layout's key rather than the layout)."""
    return static_selection(tile_layout(*layout_key), keep_per_window, fill)


def threshold_tensor(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
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


def plain_ints(values) -> tuple[int, ...]:
    """The values as Python ints. Inside a caller's torch.compile a size or token count that changed between
    calls can arrive symbolic (automatic dynamic shapes); the layout is a constant of its sizes, so each value
    is specialised (a guard: one graph per value, as static shapes give) instead of failing the trace
    (torch 2.11: "SymNodeVariable() is not a constant"), and the specialisation is announced."""
    comptime(_announce_specialised)  # runs at trace time only: a no-op outside torch.compile
    return tuple(guard_scalar(v) for v in values)


def _announce_specialised(ctx) -> None:
    """At trace time: warn if plain_ints' values are symbolic, i.e. the caller's function will compile per value."""
    if not ctx.get_local("values").is_python_constant():
        warnings.warn("bsa_flex: a video size or text-token count changed between calls of your compiled function "
                      "and is specialised: torch.compile compiles the function once per value (the tile layout is "
                      "a constant of them); pad to fixed lengths to reuse one graph", BSARecompileWarning)


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def make_plan(q, k, v, video_shape: tuple[int, int, int], config: BSAConfig, *, scale: float | None = None,
              score_mod: Callable | None = None, text_tokens: tuple[int, int] = (0, 0),
              token_order: str = "raster") -> BSAPlan:
    """The plan of one call on validated inputs: layout, kernel (logged once), scale, score_mod."""
    facts = kernel_facts(q, config.block_size, _needs_grad(q, k, v), score_mod is not None)
    kernel, reason = choose_kernel(config.kernel, facts)
    announce_kernel(kernel, reason)
    key = (plain_ints(video_shape), config.tile, config.window, config.block_size, q.device, plain_ints(text_tokens))
    return BSAPlan(config=config, layout=_layout(*key), kernel=kernel, static=_static(key, config.keep_per_window, config.fill),
                   scale=q.shape[-1] ** -0.5 if scale is None else float(scale), score_mod=score_mod,
                   token_order=token_order)


def run_operator(operator: Callable, q, k, v, plan: BSAPlan, return_stats: bool):
    """Run ``operator(q, k, v, threshold, plan)``: our compiled graph, inlined into the caller's, or eagerly.

    ``operator`` is :func:`bsa_flex.attention.sparse_attention`, or a wrapper taking and returning
    what it does but with q, k, v (and the output) laid out otherwise: ``bsa_flex.distributed``
    hands it the all-to-all's received parts, so that reassembling the sequence fuses into the graph.
    """
    # Inside a caller's compiled region on CPU, Inductor's C++ FlexAttention template finds no
    # kernel for a score_mod over our (constant) layout tensors (torch 2.13: NoValidChoicesError);
    # our own compiled graph, which takes the layout as an input, handles it.
    cpu_score_mod = q.device.type == "cpu" and plan.score_mod is not None
    if plan.kernel != "blockwise" and not (cpu_score_mod and torch.compiler.is_compiling()):
        return _run_plan(operator, q, k, v, plan, return_stats)
    if torch.compiler.is_compiling():
        reason = ("with gradients the blockwise path runs eagerly (FlexAttention has no CPU backward)"
                  if plan.kernel == "blockwise" else
                  "a score_mod runs in bsa_flex's own compiled graph (the C++ FlexAttention template cannot "
                  "take it inside yours)")
        _refuse_inside_fullgraph(reason)
        warnings.warn(f"bsa_flex: on CPU {reason}: a graph break in the compiled model", BSAEagerWarning,
                      stacklevel=3)
    return _run_plan_eagerly(operator, q, k, v, plan, return_stats)


class BSAFullgraphError(RuntimeError):
    """bsa_flex must break the caller's graph, and the caller compiled with fullgraph=True."""


@torch.compiler.assume_constant_result
def _refuse_inside_fullgraph(reason: str) -> bool:
    """At trace time: raise a BSAFullgraphError that says what to do if the caller asked for fullgraph=True."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    translator = InstructionTranslator.current_tx()
    if getattr(translator, "one_graph", False) or getattr(translator, "error_on_graph_break", False):
        raise BSAFullgraphError(
            f"bsa_flex: on CPU {reason}, which needs a graph break, and the caller compiled with "
            f"fullgraph=True: compile without fullgraph=True (bsa_flex then runs behind one graph break), "
            f"train on CUDA (one graph there), or call bsa_flex outside the compiled function")
    return False


def _run_plan(operator: Callable, q, k, v, plan: BSAPlan, return_stats: bool):
    """The operator (compiled unless already inside a compiled region or on the blockwise path), stats."""
    threshold = threshold_tensor(plan.config.kv_rule_threshold, q.device)
    if plan.kernel == "blockwise" or torch.compiler.is_compiling():
        out, lse, selection = operator(q, k, v, threshold, plan)
    else:
        out, lse, selection = _run_compiled(operator, q, k, v, threshold, plan)
    if not return_stats:
        return out
    return out, collect_stats(selection, plan.layout, lse, plan.kernel)


# The blockwise path reads a host integer; under torch.compile it must be one clean graph break
# at this call, before any value the compiler would have to rebuild after the break.
_run_plan_eagerly = torch.compiler.disable(_run_plan)
