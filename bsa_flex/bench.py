"""Benchmark BSA against dense attention: ``python -m bsa_flex.bench [--quick] [--kernel flash,triton]``.

Times forward and forward+backward of (a) ``F.scaled_dot_product_attention`` with the fastest
backend on the card, (b) FlexAttention without a mask, on its Triton kernel and (where
flash-attn-4 is installed) on its FLASH backend (FlashAttention-4), and (c) ``bsa_flex.attention``
as a user calls it, one row per BSA kernel, plus a forward breakdown of (c) by stage and its
attention kernel alone (the kernel BSA used). Sparsity is
reached through the real selection on video-like inputs: ``kv_threshold`` is bisected until the
achieved sparsity meets the target (a tensor, so this never recompiles), and the achieved value
is reported beside every time. Writes JSON, Markdown and (with matplotlib) a PNG under ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from masks import build_block_mask

from .attention import attention, select_sparse
from .config import BSAConfig
from .extras import environment, progress, pyplot_or_none
from .kernels import KERNELS
from .order import tile_order
from .paths import flex_kernel_options
from .plan import BSAPlan
from .runtime import compile_static, make_plan, threshold_tensor
from .synthetic import video_qkv

WAN_CASES = [((16, 28, 52), 0.93), ((40, 48, 80), 0.95)]  # Wan2.1-1.3B at 480p-ish / 720p-ish
SWEEP_SHAPES = [(4, 16, 32), (6, 28, 52), (16, 28, 52), (20, 40, 64), (40, 48, 80)]  # 2K ... 153.6K tokens
SWEEP_SPARSITIES = (0.90, 0.95)
# Geometries compared at the Wan cases (same target sparsity, different split between query and KV sparsity;
# keep 1.0 is KV sparsity alone, the setting that matched full attention in training)
GEOMETRIES = {"keep 0.5": {"query_keep_ratio": 0.5}, "keep 0.25": {"query_keep_ratio": 0.25}, "keep 1.0": {"query_keep_ratio": 1.0},
              # the pruned queries attend to their own tiles' KV blocks: rows of their own in the kernel
              "keep 0.5 local": {"query_keep_ratio": 0.5, "fill": "local"},
              "keep 0.25 local": {"query_keep_ratio": 0.25, "fill": "local"},
              "keep 0.5 local extra2": {"query_keep_ratio": 0.5, "fill": "local", "local_extra_kv_blocks": 2}}
BROKEN_DOWN = ("keep 0.5", "keep 1.0")  # the paper's split and BSAConfig()'s: the Wan rows with the full breakdown
FUSED_SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                       "efficient": SDPBackend.EFFICIENT_ATTENTION}
# The math backend materialises S x S scores: tried only where no fused backend runs (e.g. on CPU)
SDPA_BACKENDS = {**FUSED_SDPA_BACKENDS, "math": SDPBackend.MATH}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every case shares: attention shape besides the video, dtype, device, BSA geometry."""

    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    config: BSAConfig
    sharpness: float = 2.0


def median_ms(fn: Callable, device: torch.device, budget_ms: float = 100.0, grad_to_none=None) -> float:
    """Median time of fn in ms after warm-up: CUDA events via triton's do_bench, wall clock on CPU.

    ``grad_to_none``: leaves whose ``.grad`` is reset before each call, so that a timed backward
    writes its gradients instead of adding them to the last call's (an extra read-add-write of
    q, k and v that no training step pays twice)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=budget_ms, return_mode="median", grad_to_none=grad_to_none))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def host_ms(fn: Callable, device: torch.device, reps: int = 10) -> float | None:
    """Median host time to enqueue fn on an idle GPU, not waiting for it (None on CPU).

    Where it comes near the GPU time of fn, the call is host-bound: the GPU waits for launches.
    """
    if device.type != "cuda":
        return None
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile_table(fn: Callable, device: torch.device, path: str) -> None:
    """Write torch.profiler's tables (by device time, by host time) of one call of fn to path."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fn()
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    by_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(events.table(sort_by=by_device, row_limit=25) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")


def peak_gib(fn: Callable, device: torch.device, inputs=()) -> float | None:
    """Peak GPU memory of one call of fn: its ``inputs`` plus what fn allocates at its peak, not
    counting anything else the process holds (another row's inputs); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return step_peak_gib(torch.cuda.max_memory_allocated(), before, sum(t.nbytes for t in inputs))


def step_peak_gib(max_allocated: int, allocated_before: int, input_bytes: int) -> float:
    """GiB of one step's peak from the allocator's bytes: its inputs' bytes plus its rise above what
    was allocated before it."""
    return (input_bytes + max_allocated - allocated_before) / 2**30


def layer_peak_gib(attend: Callable, heads: int, head_dim: int, video_shape, dtype, device) -> float | None:
    """Peak GPU memory above the layer's input and weights during fwd+bwd of qkv projection + attention.

    Unlike ``peak_gib`` on leaf q/k/v, here q, k and v are activations, as in a model: whatever
    the attention does not save for its backward is freed, as it would be in a DiT block.
    """
    if device.type != "cuda":
        return None
    dim = heads * head_dim
    proj = torch.nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
    x = torch.randn(1, math.prod(video_shape), dim, device=device, dtype=dtype, requires_grad=True)

    def step():
        q, k, v = proj(x).view(1, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attend(q, k, v).sum().backward()

    step()  # compile/warm up outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return step_peak_gib(torch.cuda.max_memory_allocated(), base, 0)


def fwd_and_fwd_bwd(forward: Callable, grad_out: torch.Tensor | None, device, *, leaves=(), host: bool = False) -> dict:
    """{"fwd", "fwd_bwd": ms (None without grad_out), "peak_gib": fwd+bwd peak or None}; with ``host``
    also "host_fwd", "host_fwd_bwd": host ms to enqueue (None on CPU). ``leaves``: the inputs
    that require grad; their ``.grad`` is reset before each timed backward and before the peak
    is measured (the peak of one step: the leaves and grad_out, its working memory and its new
    gradients, whatever else the process holds)."""
    result = {"fwd": median_ms(forward, device), "fwd_bwd": None, "peak_gib": None}
    if host:
        result.update(host_fwd=host_ms(forward, device), host_fwd_bwd=None)
    if grad_out is not None:
        step = lambda: forward().backward(grad_out)  # noqa: E731
        result["fwd_bwd"] = median_ms(step, device, grad_to_none=list(leaves))
        for leaf in leaves:
            leaf.grad = None
        result["peak_gib"] = peak_gib(step, device, inputs=(*leaves, grad_out))
        if host:
            result["host_fwd_bwd"] = host_ms(step, device)
    return result


def best_sdpa(q, k, v, grad_out, device) -> dict:
    """Time every fused SDPA backend that runs here (math only if none does); the fastest by fwd+bwd wins."""
    timings = {}
    for name, backend in SDPA_BACKENDS.items():
        if name == "math" and any("error" not in t for t in timings.values()):
            timings[name] = {"error": "not tried: a fused backend ran (math materialises S x S scores)"}
            continue

        def forward(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            timings[name] = fwd_and_fwd_bwd(forward, grad_out, device, leaves=(q, k, v))
        except RuntimeError as error:  # backend not available for this card/dtype/shape
            timings[name] = {"error": str(error).splitlines()[0][:200]}
    ran = {n: t for n, t in timings.items() if "error" not in t}
    if not ran:
        raise RuntimeError(f"no SDPA backend ran: {timings}")
    key = "fwd_bwd" if grad_out is not None else "fwd"
    winner = min(ran, key=lambda n: ran[n][key])
    return {"backend": winner, **ran[winner], "all": timings}


def calibrate_threshold(q, k, v, video_shape, config: BSAConfig, target: float, *, steps: int = 14):
    """Bisect kv_threshold (higher p: denser) until the achieved sparsity is closest to target.

    Returns (config at that threshold, achieved sparsity, the kernel that ran).
    """
    def sparsity_at(p):  # with gradients on CUDA: the graph that is timed next, not one more compile
        with torch.set_grad_enabled(q.device.type == "cuda"):
            _, stats = attention(q, k, v, video_shape, dataclasses.replace(config, kv_threshold=p), return_stats=True)
        return float(stats.sparsity), stats.kernel

    lo, hi = 1e-4, 1.0
    best = (1.0, *sparsity_at(1.0))
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        achieved, kernel = sparsity_at(mid)
        if abs(achieved - target) < abs(best[1] - target):
            best = (mid, achieved, kernel)
        lo, hi = (mid, hi) if achieved > target else (lo, mid)
    return dataclasses.replace(config, kv_threshold=best[0]), best[1], best[2]


def stage_breakdown(q, k, v, plan: BSAPlan, grad_out) -> dict:
    """Forward time of the selection, of the BlockMask build, and of the plan's kernel alone (each
    compiled alone). In the whole call these stages share one graph, so their sum can exceed what
    they cost there."""
    device, layout = q.device, plan.layout
    threshold = threshold_tensor(plan.config.kv_rule_threshold, device)
    select = compile_static(lambda q, k, v: select_sparse(q, k, v, threshold, plan))
    build_mask = compile_static(lambda kv: build_block_mask(kv, layout))
    with torch.no_grad():
        ops = select(q, k, v)
        block_mask = build_mask(ops.kv_blocks)
        t_select = median_ms(lambda: select(q, k, v), device)
        t_mask = median_ms(lambda: build_mask(ops.kv_blocks), device)
    operands = [t.detach().requires_grad_(grad_out is not None) for t in (ops.q_kept, ops.k_slots, ops.v_slots)]
    options = flex_kernel_options(plan.kernel, layout.block_size)
    kernel = compile_static(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, scale=plan.scale,
                                                          enable_gqa=q.shape[1] != k.shape[1], kernel_options=options))
    kernel_grad = None if grad_out is None or device.type != "cuda" else torch.randn_like(operands[0])
    t_kernel = fwd_and_fwd_bwd(lambda: kernel(*operands), kernel_grad, device, leaves=operands)
    return {"kernel": plan.kernel, "select_ms": t_select, "block_mask_ms": t_mask, "kernel_fwd": t_kernel["fwd"],
            "kernel_fwd_bwd": t_kernel["fwd_bwd"]}


@functools.lru_cache(maxsize=1)
def _inputs(video_shape, setup: Setup):
    """q, k, v (leaves that require grad) and an output gradient, shared by the cases of one shape."""
    q, k, v = video_qkv(1, setup.heads, setup.heads, video_shape, setup.head_dim, dtype=setup.dtype,
                        device=setup.device, seed=0, sharpness=setup.sharpness, requires_grad=True)
    return q, k, v, torch.randn_like(q)


def dense_flex(q, k, v, grad_out, device, backend: str) -> dict:
    """FlexAttention without a mask on one backend ("TRITON" or "FLASH"), or why it did not run."""
    train = device.type == "cuda"
    options = {"BACKEND": backend} if device.type == "cuda" else None
    fn = compile_static(lambda q, k, v: flex_attention(q, k, v, kernel_options=options))
    inputs = (q, k, v) if train else (q.detach(), k.detach(), v.detach())
    try:
        return fwd_and_fwd_bwd(lambda: fn(*inputs), grad_out if train else None, device, leaves=inputs)
    except Exception as error:  # FLASH without flash-attn-4, or on a card it does not support  # noqa: BLE001
        return {"fwd": None, "fwd_bwd": None, "peak_gib": None, "error": str(error).splitlines()[0][:200]}


def dense_baselines(q, k, v, grad_out, device) -> dict:
    """Best fused SDPA, dense Flex on Triton, dense Flex on FLASH (CUDA only)."""
    baselines = {"sdpa": best_sdpa(q, k, v, grad_out, device), "flex_dense": dense_flex(q, k, v, grad_out, device,
                                                                                         "TRITON")}
    if device.type == "cuda":
        baselines["flash_dense"] = dense_flex(q, k, v, grad_out, device, "FLASH")
    return baselines


def _speedups(bsa: dict, baselines: dict) -> dict:
    """speedup_vs_<baseline>_<fwd|fwd_bwd> for every baseline and mode that ran."""
    return {f"speedup_vs_{name}_{mode}": dense[mode] / bsa[mode]
            for name, dense in baselines.items() for mode in ("fwd", "fwd_bwd")
            if bsa[mode] is not None and dense.get(mode) is not None}


def _layer_peaks(setup: Setup, video_shape, config: BSAConfig, sdpa_backend: str) -> dict:
    """Peak memory of projection + attention inside a layer: best SDPA backend against BSA."""
    args = (setup.heads, setup.head_dim, video_shape, setup.dtype, setup.device)

    def sdpa_attention(q, k, v):
        with sdpa_kernel([SDPA_BACKENDS[sdpa_backend]]):
            return F.scaled_dot_product_attention(q, k, v)
    return {"sdpa": layer_peak_gib(sdpa_attention, *args),
            "bsa": layer_peak_gib(lambda q, k, v: attention(q, k, v, video_shape, config), *args)}


def _stages(q, k, v, video_shape, config: BSAConfig, *, grad_out, bsa: dict, dense: dict, sparsity: float) -> dict:
    """The stage breakdown of one row, and the shares of the call's time outside the kernel."""
    train = q.device.type == "cuda"
    with torch.set_grad_enabled(train):  # the plan of the timed call: its kernel
        plan = make_plan(q, k, v, video_shape, config)
    stages = stage_breakdown(q, k, v, plan, grad_out if train else None)
    stages["rest_fwd_ms"] = bsa["fwd"] - stages["select_ms"] - stages["block_mask_ms"] - stages["kernel_fwd"]
    stages["outside_kernel_fwd"] = 1.0 - stages["kernel_fwd"] / bsa["fwd"]
    if stages["kernel_fwd_bwd"] is not None:
        stages["outside_kernel_fwd_bwd"] = 1.0 - stages["kernel_fwd_bwd"] / bsa["fwd_bwd"]
        if dense.get("fwd_bwd") is not None:  # the kernel against its own dense time x the compute fraction
            stages["kernel_vs_density_ideal"] = dense["fwd_bwd"] * (1.0 - sparsity) / stages["kernel_fwd_bwd"]
    return stages


def bench_case(video_shape, target: float, setup: Setup, geometry: str, kernel: str, *, breakdown: bool,
               baselines: dict | None, profile_dir: str | None = None) -> dict:
    """One (video shape, target sparsity, geometry, kernel) row; dense baselines are reused per shape."""
    device = setup.device
    q, k, v, grad_out = _inputs(video_shape, setup)
    baselines = baselines or dense_baselines(q, k, v, grad_out, device)
    config, achieved, ran = calibrate_threshold(
        q, k, v, video_shape, dataclasses.replace(setup.config, kernel=kernel, **GEOMETRIES[geometry]), target)
    call = lambda: attention(q, k, v, video_shape, config)  # noqa: E731
    bsa = fwd_and_fwd_bwd(call, grad_out, device, leaves=(q, k, v), host=True)
    if profile_dir is not None:
        step = (lambda: call().backward(grad_out)) if device.type == "cuda" else call
        profile_table(step, device, os.path.join(profile_dir, f"profile-{math.prod(video_shape)}-"
                                                 f"{geometry.replace(' ', '')}-{ran}.txt"))
    row = {"video_shape": list(video_shape), "tokens": math.prod(video_shape), "target_sparsity": target,
           "geometry": geometry, "kernel": ran, "query_keep_ratio": config.query_keep_ratio, "fill": config.fill,
           "local_extra_kv_blocks": config.local_extra_kv_blocks, "sparsity": achieved,
           "kv_threshold": config.kv_threshold, "bsa": bsa, **baselines, **_speedups(bsa, baselines)}
    if breakdown:
        row["layer_peak_gib"] = _layer_peaks(setup, video_shape, config, baselines["sdpa"]["backend"])
        dense = baselines.get("flash_dense" if ran == "flash" else "flex_dense", {})
        row["stages"] = _stages(q, k, v, video_shape, config, grad_out=grad_out, bsa=bsa, dense=dense,
                                sparsity=achieved)
        row["tile_order"] = tile_order_record(setup, video_shape, config, row)
        if device.type == "cuda":
            row["cuda_graphs"] = cuda_graph_record(setup, video_shape, config, row)
    return row, baselines


def graphed_fwd_bwd(forward: Callable, q, k, v, grad_out) -> dict:
    """fwd (no grad) and fwd+bwd ms of ``forward`` compiled with mode="reduce-overhead" (CUDA
    graphs), and how many graphs Inductor declined to capture (each is a launch-bound fallback).

    The gradients are returned, not accumulated into ``.grad``: a replayed backward's output
    installed as a leaf's ``.grad`` is overwritten by the next replay, and adding to it then
    fails (pytorch/pytorch#169545; seen here at 153,600 tokens, torch 2.11)."""
    from torch._dynamo.utils import counters
    graphed = torch.compile(forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
    skips = counters["inductor"]["cudagraph_skips"]

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        torch.autograd.grad(graphed(q, k, v), (q, k, v), grad_out)

    def infer():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            graphed(q, k, v)
    result = {"fwd": median_ms(infer, q.device), "fwd_bwd": median_ms(step, q.device)}
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    return result


def cuda_graph_record(setup: Setup, video_shape, config: BSAConfig, row: dict) -> dict:
    """The row's call, and the best SDPA backend, inside a caller's ``torch.compile(mode="reduce-overhead")``:
    times, speed-up over the faster of graphed and plain SDPA, outside-kernel share against the
    row's kernel alone. The forward is timed without gradients (a replayed training forward must
    be followed by its backward)."""
    q, k, v, grad_out = _inputs(video_shape, setup)
    backend = SDPA_BACKENDS[row["sdpa"]["backend"]]

    def sdpa(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    try:
        record = {"bsa": graphed_fwd_bwd(lambda q, k, v: attention(q, k, v, video_shape, config), q, k, v, grad_out),
                  "sdpa": graphed_fwd_bwd(sdpa, q, k, v, grad_out)}
    except RuntimeError as error:  # the row's other records stand; this one says why it is missing
        return {"error": str(error).splitlines()[0][:300]}
    best_sdpa_fwd_bwd = min(record["sdpa"]["fwd_bwd"], row["sdpa"]["fwd_bwd"])
    record["speedup_vs_sdpa_fwd_bwd"] = best_sdpa_fwd_bwd / record["bsa"]["fwd_bwd"]
    record["speedup_vs_sdpa_fwd"] = min(record["sdpa"]["fwd"], row["sdpa"]["fwd"]) / record["bsa"]["fwd"]
    kernel = row["stages"]
    record["outside_kernel_fwd_bwd"] = 1.0 - kernel["kernel_fwd_bwd"] / record["bsa"]["fwd_bwd"]
    record["outside_kernel_fwd"] = 1.0 - kernel["kernel_fwd"] / record["bsa"]["fwd"]
    return record


def tile_order_record(setup: Setup, video_shape, config: BSAConfig, row: dict) -> dict:
    """The same call with q, k, v (and out) kept in the tile order: times, speed-up, outside-kernel
    share against the row's kernel alone, and peak memory (leaves and inside a layer)."""
    q, k, v, grad_out = _inputs(video_shape, setup)
    to_tile = tile_order(video_shape, config, device=q.device).to_tile
    q, k, v, grad_out = (t.detach()[:, :, to_tile].requires_grad_(t.requires_grad) for t in (q, k, v, grad_out))
    tiled = functools.partial(attention, video_shape=video_shape, config=config, token_order="tile")
    record = {"bsa": fwd_and_fwd_bwd(lambda: tiled(q, k, v), grad_out, q.device, leaves=(q, k, v), host=True),
              "layer_peak_gib": layer_peak_gib(tiled, setup.heads, setup.head_dim, video_shape, setup.dtype,
                                               setup.device)}
    record.update(_speedups(record["bsa"], {"sdpa": row["sdpa"]}))
    kernel_fwd_bwd = row["stages"].get("kernel_fwd_bwd")
    if kernel_fwd_bwd is not None and record["bsa"]["fwd_bwd"] is not None:
        record["outside_kernel_fwd_bwd"] = 1.0 - kernel_fwd_bwd / record["bsa"]["fwd_bwd"]
    return record


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# bsa-flex benchmark ({env['card']}, torch {env['torch']}"
             f"{', triton ' + env['triton'] if 'triton' in env else ''}, {env['date']})", "",
             f"B=1, {result['setup']['heads']} heads, D={result['setup']['head_dim']}, {result['setup']['dtype']}; "
             f"config {result['setup']['config']}; times are medians in ms.", "",
             "| tokens | geometry | kernel | target | achieved sparsity | SDPA (backend) fwd / fwd+bwd "
             "| Flex dense Triton / FLASH fwd+bwd | BSA fwd / fwd+bwd | speed-up vs SDPA fwd / fwd+bwd "
             "| speed-up vs dense FLASH fwd / fwd+bwd | kernel alone fwd / fwd+bwd | outside kernel fwd / fwd+bwd "
             "| kernel vs density-ideal | peak GiB SDPA / BSA | in a layer: GiB SDPA / BSA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    def share(x):
        return "-" if x is None else f"{x:.0%}"

    def times(x):
        return "-" if x is None else f"{x:.2f}x"

    for r in result["rows"]:
        s, b, stages = r["sdpa"], r["bsa"], r.get("stages", {})
        triton_dense, flash_dense = r["flex_dense"], r.get("flash_dense", {})
        layer = r.get("layer_peak_gib", {})
        lines.append(
            f"| {r['tokens']:,} | {r['geometry']} | {r['kernel']} | {r['target_sparsity']:.2f} | {r['sparsity']:.3f} | "
            f"{ms(s['fwd'])} / {ms(s['fwd_bwd'])} ({s['backend']}) | "
            f"{ms(triton_dense.get('fwd_bwd'))} / {ms(flash_dense.get('fwd_bwd'))} | "
            f"{ms(b['fwd'])} / {ms(b['fwd_bwd'])} | "
            f"{times(r.get('speedup_vs_sdpa_fwd'))} / {times(r.get('speedup_vs_sdpa_fwd_bwd'))} | "
            f"{times(r.get('speedup_vs_flash_dense_fwd'))} / {times(r.get('speedup_vs_flash_dense_fwd_bwd'))} | "
            f"{ms(stages.get('kernel_fwd'))} / {ms(stages.get('kernel_fwd_bwd'))} | "
            f"{share(stages.get('outside_kernel_fwd'))} / {share(stages.get('outside_kernel_fwd_bwd'))} | "
            f"{share(stages.get('kernel_vs_density_ideal'))} | {ms(s['peak_gib'])} / {ms(b['peak_gib'])} | "
            f"{ms(layer.get('sdpa'))} / {ms(layer.get('bsa'))} |")
    lines += ["", *tile_order_lines(result["rows"]), *cuda_graph_lines(result["rows"]), *crossover_lines(result["rows"])]
    return "\n".join(lines) + "\n"


def _record_lines(rows: list[dict], key: str, line: Callable[[dict, dict], str]) -> list[str]:
    """``line(row, record)`` for every row holding the record ``key``, then a blank line (none without any)."""
    lines = [line(r, r[key]) for r in rows if r.get(key) is not None]
    return lines + [""] if lines else []


def tile_order_lines(rows: list[dict]) -> list[str]:
    """One line per row timed in the tile order as well: its fwd+bwd, speed-up, outside share, peaks."""
    return _record_lines(rows, "tile_order", _tile_order_line)


def _tile_order_line(r: dict, t: dict) -> str:
    b, outside = t["bsa"], t.get("outside_kernel_fwd_bwd")
    return (f"- tile order, {r['tokens']:,} tokens, {r['geometry']}, {r['kernel']}: fwd "
            f"{b['fwd']:.2f} ms, fwd+bwd {b['fwd_bwd'] or float('nan'):.2f} ms "
            f"({t.get('speedup_vs_sdpa_fwd_bwd', float('nan')):.2f}x vs SDPA), outside kernel "
            f"{'-' if outside is None else f'{outside:.0%}'}, peak GiB {b['peak_gib'] or float('nan'):.2f}"
            f" (in a layer {t['layer_peak_gib'] or float('nan'):.2f})")


def cuda_graph_lines(rows: list[dict]) -> list[str]:
    """One line per row timed under CUDA graphs as well: fwd / fwd+bwd, speed-ups, outside shares, skips."""
    return _record_lines(rows, "cuda_graphs", _cuda_graph_line)


def _cuda_graph_line(r: dict, g: dict) -> str:
    where = f"{r['tokens']:,} tokens, {r['geometry']}, {r['kernel']}"
    if "error" in g:
        return f"- CUDA graphs, {where}: failed: {g['error']}"
    b, s = g["bsa"], g["sdpa"]
    return (f"- CUDA graphs (a caller's mode=\"reduce-overhead\"), {where}: BSA fwd {b['fwd']:.2f} ms / fwd+bwd "
            f"{b['fwd_bwd']:.2f} ms ({g['speedup_vs_sdpa_fwd']:.2f}x / {g['speedup_vs_sdpa_fwd_bwd']:.2f}x vs the "
            f"faster of graphed SDPA {s['fwd']:.2f} / {s['fwd_bwd']:.2f} ms and plain SDPA), outside kernel "
            f"{g['outside_kernel_fwd']:.0%} / {g['outside_kernel_fwd_bwd']:.0%}, graphs not captured: "
            f"{b['cudagraph_skips']} BSA, {s['cudagraph_skips']} SDPA")


def sweep_geometry(rows: list[dict]) -> str | None:
    """The geometry the crossover lines and the plot follow: the first of GEOMETRIES that the rows measured."""
    measured = {r["geometry"] for r in rows}
    return next((g for g in GEOMETRIES if g in measured), None)


def _sweep_rows(rows: list[dict], target: float, kernel: str) -> list[dict]:
    """Rows of the sweep geometry on one kernel at one target sparsity, by sequence length."""
    geometry = sweep_geometry(rows)
    return sorted((r for r in rows if r["target_sparsity"] == target and r["geometry"] == geometry
                   and r["kernel"] == kernel), key=lambda r: r["tokens"])


def _targets_and_kernels(rows: list[dict]) -> list[tuple[float, str]]:
    return sorted({(r["target_sparsity"], r["kernel"]) for r in rows})


def _speedup_key(rows: list[dict]) -> str:
    return "speedup_vs_sdpa_fwd_bwd" if all("speedup_vs_sdpa_fwd_bwd" in r for r in rows) else "speedup_vs_sdpa_fwd"


def crossover_lines(rows: list[dict]) -> list[str]:
    """Per target sparsity and kernel: the shortest measured sequence from which BSA beats the best SDPA."""
    lines = []
    for target, kernel in _targets_and_kernels(rows):
        sweep = _sweep_rows(rows, target, kernel)
        if len(sweep) < 2:
            continue
        key = _speedup_key(sweep)
        losing = [r["tokens"] for r in sweep if r[key] <= 1.0]
        winning = [r["tokens"] for r in sweep if r[key] > 1.0 and (not losing or r["tokens"] > max(losing))]
        mode = f"{'fwd+bwd' if key.endswith('fwd_bwd') else 'fwd'}, {sweep_geometry(rows)}"
        if not winning:
            lines.append(f"- sparsity {target:.2f}, {kernel}: BSA does not beat SDPA ({mode}) at any measured length.")
        elif not losing:
            lines.append(f"- sparsity {target:.2f}, {kernel}: BSA beats SDPA ({mode}) at every measured length, "
                         f"from {sweep[0]['tokens']:,} tokens ({sweep[0][key]:.2f}x).")
        else:
            lines.append(f"- sparsity {target:.2f}, {kernel}: BSA beats SDPA ({mode}) from {min(winning):,} tokens "
                         f"on; not at {max(losing):,}.")
    return lines


def plot(result: dict, path: str) -> str | None:
    """Speed-up over SDPA (fwd+bwd where measured) against tokens, one line per target sparsity and kernel."""
    plt = pyplot_or_none()
    if plt is None:
        return "matplotlib is not installed (pip install 'bsa-flex[bench]'): no plot written"
    fig, ax = plt.subplots(figsize=(6, 4))
    for target, kernel in _targets_and_kernels(result["rows"]):
        rows = _sweep_rows(result["rows"], target, kernel)
        if not rows:
            continue
        key = _speedup_key(rows)
        ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], marker="o",
                label=f"sparsity {target:.2f}, {kernel}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("speed-up over best SDPA")
    ax.set_title(f"{result['environment']['card']}, {sweep_geometry(result['rows'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


PARTS = ("all", "wan", "sweep", "frontier")
FRONTIER_SPARSITIES = (0.90, 0.93, 0.95)  # the quality-speed frontier's total sparsities (issue 15)


def plan(quick: bool, part: str, sparsities, kernels=("auto",), geometries=tuple(GEOMETRIES),
         shapes=None) -> list[tuple[tuple[int, int, int], float, str, str, bool]]:
    """(video shape, target sparsity, geometry, kernel, with stage breakdown) for every case to run.

    "wan": the two Wan2.1 cases in every geometry, those of ``BROKEN_DOWN`` with the stage
    breakdown, the tile-order record and (on CUDA) the CUDA-graph record;
    "sweep": sequence lengths x sparsities in the default geometry (the Wan cases' default row
    counts for both); "frontier": the Wan video shapes at the frontier's sparsities in every
    geometry, without breakdown (not part of "all"). Every case runs on every kernel; ``shapes``
    keeps only those video shapes.
    """
    default = next(iter(GEOMETRIES))
    if quick:
        return [((4, 8, 8), 0.5, default, kernel, True) for kernel in kernels]
    cases = []
    if part in ("all", "wan"):
        cases += [(shape, target, geometry, geometry in BROKEN_DOWN) for shape, target in WAN_CASES
                  for geometry in geometries]
    if part in ("all", "sweep"):
        cases += [(shape, s, default, False) for shape in SWEEP_SHAPES for s in sparsities
                  if part == "sweep" or (shape, s) not in WAN_CASES]
    if part == "frontier":
        cases += [(shape, s, geometry, False) for shape, _ in WAN_CASES for s in FRONTIER_SPARSITIES
                  for geometry in geometries]
    return [(shape, target, geometry, kernel, breakdown) for shape, target, geometry, breakdown in cases
            for kernel in kernels if shapes is None or shape in shapes]


def _write(result: dict, out: str, stem: str) -> str:
    """Write <stem>.json and <stem>.md under out; return the Markdown table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table)
    return table


def run(*, quick: bool = False, device: str | None = None, out: str = "benchmarks/results",
        sparsities=SWEEP_SPARSITIES, part: str = "all", kernels=("auto",), geometries=tuple(GEOMETRIES),
        shapes=None, profile: bool = False) -> dict:
    """Run the benchmark, write bench[-part].json / .md / .png under ``out``, return the result.

    The JSON and Markdown files are rewritten after every case, so a run cut short keeps what it measured.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quick:
        setup = Setup(heads=2, head_dim=32, dtype=torch.float32, device=device, config=BSAConfig(block_size=32))
    else:
        setup = Setup(heads=12, head_dim=128, dtype=torch.bfloat16, device=device, config=BSAConfig())
    cases = plan(quick, part, sparsities, kernels, geometries, shapes)
    stem = "bench" if part == "all" else f"bench-{part}"
    setup_info = {"heads": setup.heads, "head_dim": setup.head_dim, "dtype": str(setup.dtype).replace("torch.", ""),
                  "config": repr(setup.config), "geometries": GEOMETRIES, "kernels_requested": list(kernels),
                  "inputs": f"bsa_flex.synthetic.video_qkv(sharpness={setup.sharpness})"}
    result = {"environment": environment(device), "setup": setup_info, "quick": quick, "part": part, "rows": []}
    baselines, bar = {}, progress(len(cases), "bsa-flex bench")
    for shape, target, geometry, kernel, breakdown in cases:
        row, baselines[shape] = bench_case(shape, target, setup, geometry, kernel, breakdown=breakdown,
                                           baselines=baselines.get(shape),
                                           profile_dir=os.path.join(out, "profiles") if profile else None)
        result["rows"].append(row)
        table = _write(result, out, stem)
        bar.update(1)
    bar.close()
    note = plot(result, os.path.join(out, f"{stem}.png"))
    print(table)
    if note:
        print(note)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bsa_flex.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny case (a smoke test; runs on CPU)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--out", default="benchmarks/results", help="folder for bench.json/.md/.png")
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="wan: the two Wan2.1 cases in every geometry with a stage breakdown; sweep: "
                             "sequence lengths x sparsities; all: both (default); frontier: the Wan shapes at "
                             "sparsities 0.90, 0.93, 0.95 in every geometry (the quality-speed frontier's speed-ups)")
    parser.add_argument("--sparsities", default=",".join(map(str, SWEEP_SPARSITIES)),
                        help="target sparsities of the sequence-length sweep, comma-separated")
    parser.add_argument("--kernel", default="auto",
                        help=f"BSAConfig.kernel of the BSA rows, comma-separated (one row each): {', '.join(KERNELS)}")
    parser.add_argument("--geometries", default=",".join(GEOMETRIES),
                        help=f"geometries of the Wan cases, comma-separated: {', '.join(GEOMETRIES)}")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler tables of one BSA call per row under OUT/profiles/")
    parser.add_argument("--shapes", default=None,
                        help="only these video shapes, e.g. 16x28x52,40x48x80 (default: all of the part)")
    return parser


def _comma_list(parser, flag: str, text: str, parse: Callable, valid: Callable) -> tuple:
    """A comma-separated command-line value, parsed item by item, or a usage error naming the flag."""
    try:
        items = tuple(parse(item) for item in text.split(","))
    except ValueError:
        items = None
    if items is None or not all(valid(item) for item in items):
        parser.error(f"{flag} got {text!r}: see --help for its form")
    return items


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    sparsities = _comma_list(parser, "--sparsities", args.sparsities, float, lambda s: 0.0 <= s < 1.0)
    kernels = _comma_list(parser, "--kernel", args.kernel, str, lambda k: k in KERNELS)
    geometries = _comma_list(parser, "--geometries", args.geometries, str, lambda g: g in GEOMETRIES)
    shapes = None if args.shapes is None else set(_comma_list(
        parser, "--shapes", args.shapes, lambda s: tuple(int(n) for n in s.split("x")), lambda s: len(s) == 3))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    run(quick=args.quick, device=args.device, out=args.out, sparsities=sparsities, part=args.part, kernels=kernels,
        geometries=geometries, shapes=shapes, profile=args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
