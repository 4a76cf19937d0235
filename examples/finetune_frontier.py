"""Fine-tune a trained dense video DiT with BSA: KV-only and bidirectional arms, fill rules,
space/time windows, 3 seeds, and the quality-speed frontier (issue 15).

    python examples/finetune_frontier.py pretrain --out OUT            # dense from scratch, checkpoint
    python examples/finetune_frontier.py pretrain --out OUT --scene plain --pretrain-steps 10000  # easier data
    python examples/finetune_frontier.py finetune --out OUT --seed 0   # every arm from the checkpoint
    python examples/finetune_frontier.py finetune --out OUT --seed 1 & ... # seeds in parallel (one GPU is enough)
    python examples/finetune_frontier.py finetune --out OUT --seed 0 --finetune-steps 1500 --arms dense,kv_0.90
    python examples/finetune_frontier.py summarize --out OUT[,OUT2...] [--bench benchmarks/results/bench-frontier.json]
    python examples/finetune_frontier.py concentration --out OUT       # how block-sparse the checkpoint's attention is
    python examples/finetune_frontier.py training-free --out OUT --arms kv_0.93_budget --clips 2  # no fine-tune, CPU
    python examples/finetune_frontier.py pretrain --setting cpu --registers 16 --out OUT  # 1,024 tokens, 2 cores
    python examples/finetune_frontier.py pretrain --tiny --out /tmp/ft  # CPU smoke run (then finetune --tiny)

The regime of the paper (secondary sources): a dense model trained first, then every arm continues
from that checkpoint for the same steps with the same data and noise per seed, sparsity raised in
stairs every 30 steps (the KV threshold 1.0 -> p, a tensor; the keep ratio 0.75 -> its final value).
Each arm's final p is chosen on the checkpoint so that its total sparsity (query and KV sides
together) meets the arm's target. ``summarize`` writes quality_frontier.json (one row per arm, the
validation-loss gap to the dense arm over seeds, and the fwd+bwd speed-up the same split reaches
at the Wan shapes in ``python -m bsa_flex.bench --part frontier``), frontier.png and samples.png.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import json
import math
import os
import re
import statistics
import sys
import time

import torch

from bsa_flex import BSAConfig, FlowTimeSplit, LayerSparsity, SparsitySchedule, layer_stats
from bsa_flex.extras import environment, pyplot_or_none
from bsa_flex.kernels import choose_kernel, kernel_facts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # video_dit beside this script, however run
from video_dit import (SCENES, VideoDiT, autocast_dtype, concentration, make_clips, plot_samples, sample,  # noqa: E402
                       VALIDATION_TIMES, step_noise, train_step, unshift_time, validation_losses)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The model, data and step counts every arm shares."""

    latent: tuple[int, int, int]
    patch: tuple[int, int, int] = (1, 2, 2)
    channels: int = 4
    width: int = 256
    layers: int = 4
    heads: int = 4
    batch: int = 4
    block_size: int = 128
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-3
    pretrain_lr_final: float | None = 2e-4  # cosine decay to it over the pre-training; None: constant
    pretrain_ema: float | None = None  # decay of the weights' moving average the checkpoint takes; None: last weights
    finetune_steps: int = 300
    finetune_lr: float = 2e-4
    scene: str = "textured"  # video_dit.SCENES
    time_shift: float = 1.0  # video_dit.shift_time of the training times and of the sampler's steps
    registers: int = 0  # VideoDiT's learned non-video tokens, attended by every query whatever BSA selects

    @property
    def tokens(self) -> int:
        return math.prod(n // p for n, p in zip(self.latent, self.patch))


SETTINGS = {
    # 16 x 32 x 64 latents -> 16 x 16 x 32 = 8,192 tokens, 64 KV blocks of 128 per query block; the weights'
    # average and twice the clips per step since 2026-12-05 (validation loss 0.1425 against 0.1496; the samples
    # still blobs); time shift 3 since the same day: flat-coloured objects appear in the samples (without it,
    # a nearly flat sample), at a higher validation loss (0.196: the loss weighs every time alike, the shift
    # trains less at low noise); the sprites scene and 5,000 steps since 2026-12-06, the recipe of the shifted
    # checkpoints every later GPU arm ran on (before, each run passed them as flags; one run without them
    # pre-trained the textured scene for 3,000 steps)
    "gpu": Setting(latent=(16, 32, 64), batch=8, pretrain_steps=5000, pretrain_ema=0.999, time_shift=3.0,
                   scene="sprites"),
    # for CPU probes of relative gaps: 8 x 8 x 16 = 1,024 tokens, 64 KV blocks of 16 as in the GPU setting, the
    # sprites scene; pre-trains in about 10 minutes on 2 cores alone (one thread per run when two share them);
    # too small to sample shapes (2026-12-05: validation loss 0.72, samples noise)
    "cpu": Setting(latent=(8, 16, 32), width=96, layers=3, heads=4, batch=4, block_size=16, pretrain_steps=2000,
                   pretrain_ema=0.999, time_shift=3.0, scene="sprites"),
    "tiny": Setting(latent=(4, 16, 16), width=64, layers=2, heads=2, batch=2, block_size=16, pretrain_steps=6,
                    finetune_steps=4),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tune arm: dense (keep None), or BSA at a final keep ratio, fill, windows and total sparsity.

    layer_keep: (layer, keep ratio) pairs replacing ``keep`` in those layers (the setting must have them).
    kv_budget: the KV rule's cap as a share of the KV blocks (``BSAConfig.kv_budget``: rounded up to a count),
    None for none; with a cap the KV threshold is calibrated under it, so the cap rather than p sets most rows'
    block count. budget_ramp: the cap comes down in the arm's stairs from every block
    (``SparsitySchedule.final_kv_budget``) instead of holding from the first step. high_noise: (t0, keep,
    kv_budget) triples, t0 increasing: from flow time t0 on, that keep ratio and KV budget instead (p calibrated
    to the same target), a ``bsa_flex.FlowTimeSplit`` of one group more than triples. distill: the share of the
    training target taken from the dense teacher's velocity instead of the data's (``video_dit.flow_loss``).
    local_extra_kv_blocks: with fill "local", the KV blocks beyond their own tiles' that the pruned queries' rows
    attend (``BSAConfig.local_extra_kv_blocks``).
    """

    name: str
    keep: float | None = None
    target: float | None = None
    fill: str = "most_similar"
    windows: tuple[tuple[int, int, int], ...] = ()
    layer_keep: tuple[tuple[int, float], ...] = ()
    kv_budget: float | None = None
    budget_ramp: bool = False
    high_noise: tuple[tuple[float, float, float | None], ...] = ()
    distill: float = 0.0
    local_extra_kv_blocks: int = 0

    @property
    def budget_in_schedule(self) -> bool:
        """Whether the arm's schedule sets the KV budget (a ramped cap; a split's caps differ by group) rather
        than the model's config."""
        return self.budget_ramp or bool(self.high_noise)


ARMS = [Arm("dense")]
ARMS += [Arm(f"kv_{s:.2f}", 1.0, s) for s in (0.90, 0.93, 0.95)]
ARMS += [Arm(f"bsa_{s:.2f}", 0.5, s) for s in (0.90, 0.93, 0.95)]
# below the Wan sparsities: where each split still stays within 2% (no bench row: no speed-up)
ARMS += [Arm("kv_0.50", 1.0, 0.50), Arm("kv_0.75", 1.0, 0.75), Arm("bsa_0.75", 0.5, 0.75)]
# lower still (2026-12-03: KV side alone at 0.50 was +10.8%): the KV side at 0.25, and the query side
# alone (keep 0.5, the KV threshold calibrated to 1.0: total sparsity 0.50 from pruning queries only)
ARMS += [Arm("kv_0.25", 1.0, 0.25), Arm("bsa_0.50", 0.5, 0.50)]
ARMS += [Arm(f"bsa_0.93_{fill}", 0.5, 0.93, fill) for fill in ("anchor", "nearest", "none")]
ARMS += [Arm("bsa_0.93_space_time", 0.5, 0.93, windows=((1, 2, 2), (2, 1, 1)))]
# queries pruned only where the checkpoint tolerates it (2026-12-03, sprites, CPU, no fine-tuning, every KV
# block kept: keep 0.5 in layer 3 alone +4.8%, layer 1 alone +15%, layers 0 / 2 +38% / +48%, all +137%)
ARMS += [Arm("kv_0.90_q13", 1.0, 0.90, layer_keep=((1, 0.5), (3, 0.5))),
         Arm("kv_0.93_q13", 1.0, 0.93, layer_keep=((1, 0.5), (3, 0.5)))]
# the from-scratch KV-only arm that matched dense (-3.1%) kept p = 0.9 under a budget of about 1 - sparsity of the
# blocks, while the fine-tune arms reach their sparsity by a low calibrated p and no budget: the same total, but
# blocks allocated per row by the cap instead of by the mass
# (whole blocks of the GPU setting's 64: 6, 4 and 3 for KV-only at 0.90 / 0.93 / 0.95, 9 for keep 0.5 at 0.93)
ARMS += [Arm(f"kv_{s:.2f}_budget", 1.0, s, kv_budget=round((1.0 - s) * 64) / 64) for s in (0.90, 0.93, 0.95)]
ARMS += [Arm("bsa_0.93_budget", 0.5, 0.93, kv_budget=9 / 64)]  # keep 0.5: the KV side at 0.86
ARMS += [Arm("kv_0.93_budget_ramp", 1.0, 0.93, kv_budget=4 / 64, budget_ramp=True)]  # kv_0.93_budget's 4, in stairs
# fewer queries, more KV blocks at the same total (the KV side at 0.72 / 0.44): where the flow time is high, the
# checkpoint's attention is global (2026-12-05, training-free, the KV-only arm's loss at t = 0.95 is 3.8x dense's)
ARMS += [Arm("bsa_0.93_keep0.25_budget", 0.25, 0.93, kv_budget=18 / 64),
         Arm("bsa_0.93_keep0.125_budget", 0.125, 0.93, kv_budget=36 / 64)]
# ... and the split by flow time that measurement suggests: every query and 4 of 64 KV blocks below t = 0.75 (the
# KV-only arm was the best 0.93 split there), a quarter of the queries and 18 blocks from it on (the best there);
# fine-tuned on the H100 (2026-12-06) split_0.93_budget lost to KV-only: +30.3% against +23.6%
ARMS += [Arm("split_0.93_budget", 1.0, 0.93, kv_budget=4 / 64, high_noise=((0.75, 0.25, 18 / 64),)),
         Arm("split3_0.93_budget", 1.0, 0.93, kv_budget=4 / 64, high_noise=((0.75, 0.25, 18 / 64), (0.9, 0.125, 36 / 64)))]
# self-distillation: the target is the dense teacher's velocity, its estimate of E[eps - x0 | x_t], where the data
# give one draw of it: at high noise, where the sparse arms' gaps sit, that draw's spread is largest
# (2026-12-06: no change on the H100, +22.1% / +55.3% against +23.6% / +55.8%; worse on the CPU model)
ARMS += [Arm("kv_0.93_budget_distill", 1.0, 0.93, kv_budget=4 / 64, distill=1.0),
         Arm("bsa_0.93_budget_distill", 0.5, 0.93, kv_budget=9 / 64, distill=1.0)]
# the pruned queries attend to their own tiles' KV blocks instead of copying a kept query's output (fill "local";
# 2026-12-06, a CPU probe of the same rule: keep 0.5 fine-tuned as KV-only did at the same total, where copying
# cost +8.9%); the kept queries' cap is lower so that the total, the local rows counted, can reach 0.93: 8 of 64 at
# the GPU setting (a block of pruned rows attends 2 KV blocks), 6 at the CPU setting's (4 blocks of 16 per tile)
ARMS += [Arm("bsa_0.93_local_budget8", 0.5, 0.93, "local", kv_budget=8 / 64),
         Arm("bsa_0.93_local_budget6", 0.5, 0.93, "local", kv_budget=6 / 64),
         Arm("bsa_0.93_keep0.25_local_budget6", 0.25, 0.93, "local", kv_budget=6 / 64),  # CPU: three quarters local
         Arm("bsa_0.93_keep0.25_local_budget12", 0.25, 0.93, "local", kv_budget=12 / 64),  # GPU: 0.25 x 12 + 0.75 x 2
         Arm("bsa_0.90_local_budget11", 0.5, 0.90, "local", kv_budget=11 / 64),  # GPU: the frontier's other totals
         Arm("bsa_0.95_local_budget5", 0.5, 0.95, "local", kv_budget=5 / 64),
         Arm("bsa_0.95_keep0.25_local_budget7", 0.25, 0.95, "local", kv_budget=7 / 64)]  # GPU: 0.25 x 7 + 0.75 x 2
# at the CPU setting the KV side at 0.93 is itself nearly local (4.7 of 64 blocks, the own tile 4); at 0.80 it
# keeps about 13, 9 beyond the own tile: there local rows (4 blocks) can fall short of what the KV rule chooses
ARMS += [Arm("kv_0.80_budget13", 1.0, 0.80, kv_budget=13 / 64), Arm("bsa_0.80_budget26", 0.5, 0.80, kv_budget=26 / 64),
         Arm("bsa_0.80_local_budget22", 0.5, 0.80, "local", kv_budget=22 / 64)]
# the pruned queries' rows given the KV rule's 4 most probable blocks beyond their tile (CPU: 4 + 4 of 64; the kept
# queries' cap lowered to keep the total), and the same on the GPU setting at 0.93 (2 + 2 of 64)
ARMS += [Arm("bsa_0.80_local_extra4_budget18", 0.5, 0.80, "local", kv_budget=18 / 64, local_extra_kv_blocks=4),
         Arm("bsa_0.80_local_extra8_budget14", 0.5, 0.80, "local", kv_budget=14 / 64, local_extra_kv_blocks=8),
         Arm("bsa_0.93_local_extra2_budget6", 0.5, 0.93, "local", kv_budget=6 / 64, local_extra_kv_blocks=2)]
# where the splits come within 2% of dense (CPU setting, total 0.60): KV only, and keep 0.5 with the pruned queries'
# rows over their own tile (4 of 64) or 8 more of the most probable blocks; the kept queries' cap keeps the total
ARMS += [Arm("kv_0.60_budget26", 1.0, 0.60, kv_budget=26 / 64),
         Arm("bsa_0.60_local_budget47", 0.5, 0.60, "local", kv_budget=47 / 64),
         Arm("bsa_0.60_local_extra8_budget39", 0.5, 0.60, "local", kv_budget=39 / 64, local_extra_kv_blocks=8),
         Arm("kv_0.70_budget19", 1.0, 0.70, kv_budget=19 / 64),  # between 0.60 and 0.80 (0.5 x 26 + 0.5 x 12)
         Arm("bsa_0.70_local_extra8_budget26", 0.5, 0.70, "local", kv_budget=26 / 64, local_extra_kv_blocks=8)]
# the GPU setting's next questions: extra blocks where a quarter is kept (0.25 x 6 + 0.75 x (2 + 2) of 64 at
# 0.93), and more of them at 0.90 (0.5 x 7 + 0.5 x (2 + 4))
ARMS += [Arm("bsa_0.93_keep0.25_local_extra2_budget6", 0.25, 0.93, "local", kv_budget=6 / 64, local_extra_kv_blocks=2),
         Arm("bsa_0.90_local_extra4_budget7", 0.5, 0.90, "local", kv_budget=7 / 64, local_extra_kv_blocks=4)]


# 100 since 2026-12-05 (20 before): on a small sprites model the samples' spread grew with the step count, 0.82 of
# the data's at 20 steps and 0.91 at 100 (CPU, NOTES.md), the denoiser's estimate at t >= 0.9 being near the mean
SAMPLE_STEPS = 100


# ----------------------------------------------------------------------------- pieces

def build_model(setting: Setting, device, fill: str = "most_similar", kernel: str = "auto",
                kv_budget: float | None = None, local_extra_kv_blocks: int = 0) -> VideoDiT:
    """The DiT with BSA-capable attention layers of one fill rule and KV budget (``BSAConfig.kv_budget``, None
    for none), dense until a schedule says otherwise."""
    bsa = BSAConfig(block_size=setting.block_size, fill=fill, kernel=kernel, kv_budget=kv_budget,
                    local_extra_kv_blocks=local_extra_kv_blocks)
    model = VideoDiT(setting.channels, setting.patch, setting.width, setting.layers, setting.heads, bsa,
                     registers=setting.registers).to(device)
    for layer in model.attention_layers:
        layer.set_sparsity(LayerSparsity(True, 1.0, 1.0))
    return model


def checkpoint_model(setting: Setting, out: str, device, arm: Arm | None = None, kernel: str = "auto") -> VideoDiT:
    """The dense checkpoint under ``out`` in a model built for ``arm`` (its fill rule, and its KV budget unless a
    schedule sets it; None: the defaults), dense until a schedule says otherwise."""
    arm = Arm("dense") if arm is None else arm
    model = build_model(setting, device, arm.fill, kernel, None if arm.budget_in_schedule else arm.kv_budget,
                        arm.local_extra_kv_blocks)
    model.load_state_dict(torch.load(os.path.join(out, "dense.pt"), map_location=device))
    return model


def train_steps(model, setting: Setting, steps: int, lr: float, seed: int, schedule=None,
                lr_final: float | None = None, ema: float | None = None, teacher=None, distill: float = 0.0
                ) -> list[float]:
    """``steps`` AdamW steps of flow matching on the seed's data stream and noise (learning rate ``lr``,
    cosine-decayed to ``lr_final`` where given); the training losses. With ``ema`` the model ends holding
    the exponential moving average of its weights (that decay per step) instead of the last weights. ``schedule``:
    a SparsitySchedule, or a FlowTimeSplit (each step's batch runs once per group of its flow times). ``teacher``,
    ``distill``: see ``video_dit.flow_loss``."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    decay = (None if lr_final is None else
             torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, steps), eta_min=lr_final))
    params = [p for p in model.parameters() if p.requires_grad]
    average = None if ema is None else [p.detach().clone() for p in params]
    losses = []
    for step in range(steps):
        clean = make_clips([seed * 1_000_000 + step * setting.batch + i for i in range(setting.batch)],
                           *setting.latent, setting.channels, device, scene=setting.scene)
        noise, t = step_noise(step, clean.shape, device, salt=seed, shift=setting.time_shift)
        groups = None
        if isinstance(schedule, FlowTimeSplit):
            groups = [(functools.partial(schedule.apply, model.attention_layers, step, group), rows)
                      for group, rows in schedule.groups(t)]
        elif schedule is not None:
            schedule.apply(model.attention_layers, step)
        losses.append(float(train_step(model, optimiser, clean, noise, t, dtype, groups=groups, teacher=teacher,
                                       distill=distill)))
        if decay is not None:
            decay.step()
        if average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(average, params, 1.0 - ema)  # one launch per step, as the optimisers' foreach
    if average is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, average)
    return losses


def validation_clips(setting: Setting, device) -> torch.Tensor:
    return make_clips([900_000 + i for i in range(4)], *setting.latent, setting.channels, device, scene=setting.scene)


def validation_record(model, clips, dtype, at_time=None) -> dict:
    """val_loss (the mean) and val_loss_by_time (one per video_dit.VALIDATION_TIMES: where a gap sits in the flow);
    ``at_time``: see ``setter_by_time``."""
    by_time = validation_losses(model, clips, dtype, at_time)
    return {"val_loss": sum(by_time) / len(by_time), "val_loss_by_time": by_time}


def sparsity_of(model, clips, dtype) -> float:
    """Mean total sparsity over the layers of one no-grad forward on ``clips`` at flow time 0.5."""
    t = torch.full((clips.shape[0],), 0.5, device=clips.device)
    noise, _ = step_noise(40_000_000, clips.shape, clips.device, salt=11)
    with torch.no_grad(), torch.autocast(clips.device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(0.5 * clips + 0.5 * noise, t)
    return statistics.fmean(row["sparsity"] for row in layer_stats(model.attention_layers))


def training_kernel(requested: str, setting: Setting, device, dtype) -> str:
    """The attention kernel bsa_flex picks for the training calls of this setting."""
    probe = torch.empty(1, 1, 1, setting.width // setting.heads, device=device, dtype=dtype)
    return choose_kernel(requested, kernel_facts(probe, setting.block_size, True, False))[0]


def schedule_for(arm: Arm, threshold: float, steps: int, budget_in_schedule: bool = False) -> SparsitySchedule:
    """The arm's ramp: stairs every 30 steps (or steps/10) over the first 60% of the steps. The KV budget is the
    schedule's where the arm says so, or held from the start with ``budget_in_schedule`` (a split's group;
    else the model's config)."""
    ramp = int(0.6 * steps)
    in_schedule = arm.budget_in_schedule or budget_in_schedule
    return SparsitySchedule(final_keep_ratio=arm.keep, final_kv_threshold=threshold, ramp_steps=ramp,
                            final_kv_budget=arm.kv_budget if in_schedule else None,
                            start_kv_budget=1.0 if arm.budget_ramp or arm.kv_budget is None else arm.kv_budget,
                            every=max(1, min(30, ramp // 10)), start_keep_ratio=max(arm.keep, 0.75),
                            windows=arm.windows,
                            layer_overrides={layer: {"final_keep_ratio": keep} for layer, keep in arm.layer_keep})


def calibrate(model, arm: Arm, clips, dtype, steps: int = 12, budget_in_schedule: bool = False) -> tuple[float, float]:
    """The final KV threshold p whose total sparsity on the checkpoint is closest to the arm's target:
    (p, that sparsity). Bisection over p (a tensor: no recompiles)."""
    final = schedule_for(arm, 1.0, 10, budget_in_schedule)
    lo, hi, best = 1e-4, 1.0, None
    for _ in range(steps):
        p = 0.5 * (lo + hi)
        schedule = dataclasses.replace(final, final_kv_threshold=p)
        schedule.apply(model.attention_layers, 10**6)  # the end of the ramp
        achieved = sparsity_of(model, clips, dtype)
        if best is None or abs(achieved - arm.target) < abs(best[1] - arm.target):
            best = (p, achieved)
        lo, hi = (p, hi) if achieved > arm.target else (lo, p)
    return best


def group_arms(arm: Arm) -> list[Arm]:
    """The arm's setting per group of flow times: itself, or its own below the first ``high_noise`` time and each
    triple's from its time."""
    low = dataclasses.replace(arm, high_noise=())
    return [low] + [dataclasses.replace(low, keep=keep, kv_budget=budget) for _, keep, budget in arm.high_noise]


def calibrated_schedule(model, arm: Arm, clips, dtype, steps: int) -> tuple:
    """The arm's ramp over ``steps`` at its calibrated p: (SparsitySchedule, or FlowTimeSplit for a high_noise
    arm; its p, a list of one per group for a split; the mean over groups of the sparsity reached on the
    checkpoint)."""
    if not arm.high_noise:
        p, sparsity = calibrate(model, arm, clips, dtype)
        return schedule_for(arm, p, steps), p, sparsity
    groups = group_arms(arm)  # plain arms, each holding its budget in the split's schedule
    found = [calibrate(model, group, clips, dtype, budget_in_schedule=arm.budget_in_schedule) for group in groups]
    schedules = tuple(schedule_for(group, p, steps, budget_in_schedule=arm.budget_in_schedule)
                      for group, (p, _) in zip(groups, found))
    boundaries = tuple(t0 for t0, _, _ in arm.high_noise)
    return FlowTimeSplit(boundaries, schedules), [p for p, _ in found], statistics.fmean(s for _, s in found)


def setter_by_time(schedule, layers, step: int):
    """For validation and sampling: a callback setting the layers to the schedule's value at ``step`` for a flow
    time (a FlowTimeSplit's group of that time); None without a schedule (dense)."""
    if schedule is None:
        return None
    if isinstance(schedule, FlowTimeSplit):
        return lambda t: schedule.apply(layers, step, schedule.group_of(t))
    return lambda t: schedule.apply(layers, step)


def sparsity_by_group(model, schedule, clips, dtype, step: int) -> list[float]:
    """Total sparsity of each FlowTimeSplit group's setting at ``step``; of the layers' current setting otherwise."""
    if not isinstance(schedule, FlowTimeSplit):
        return [sparsity_of(model, clips, dtype)]
    found = []
    for group in range(len(schedule.schedules)):
        schedule.apply(model.attention_layers, step, group)
        found.append(sparsity_of(model, clips, dtype))
    return found


# ----------------------------------------------------------------------------- commands

def checkpoint_setting(out: str) -> Setting:
    """The setting the checkpoint under ``out`` was pre-trained in (its pretrain.json), so that the
    arms continue on the same data."""
    with open(os.path.join(out, "pretrain.json")) as f:
        return recorded_setting(json.load(f)["setting"])


def recorded_setting(fields: dict) -> Setting:
    """A Setting from its record in pretrain.json, older records' missing fields at what those runs did."""
    fields = dict(fields)
    fields.setdefault("pretrain_lr_final", None)  # checkpoints from before the field trained at a constant rate
    fields.setdefault("pretrain_ema", None)  # and took the last weights
    fields.setdefault("time_shift", 1.0)  # and drew unshifted times
    fields.setdefault("registers", 0)  # and had no registers
    return Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def pretrain(setting: Setting, out: str, device) -> dict:
    """Dense training from scratch; writes dense.pt, pretrain.json and the checkpoint's samples."""
    torch.manual_seed(0)
    model = build_model(setting, device)
    dtype = autocast_dtype(device)
    start = time.perf_counter()
    losses = train_steps(model, setting, setting.pretrain_steps, setting.pretrain_lr, seed=0,
                         lr_final=setting.pretrain_lr_final, ema=setting.pretrain_ema)
    clips = validation_clips(setting, device)
    record = {"setting": dataclasses.asdict(setting), "environment": environment(device),
              "wall_s": time.perf_counter() - start, "train_loss": losses[::10],
              **validation_record(model, clips, dtype),
              "concentration": concentration_record(model, setting, clips, dtype)}
    torch.save(model.state_dict(), os.path.join(out, "dense.pt"))
    save_samples(model, clips, dtype, os.path.join(out, "samples_pretrained.pt"), "pretrained", setting.time_shift)
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def concentration_record(model, setting: Setting, clips, dtype) -> dict:
    """The dense model's attention mass on its best 10% of KV blocks per query block: per layer and flow time,
    and the mean (the paper's models concentrate most of it there; a diffuse model cannot train sparse)."""
    rows = concentration(model, clips, setting.block_size, dtype)
    return {"rows": rows, "mean": statistics.fmean(r["top_kv_block_mass"] for r in rows)}


def measure_concentration(out: str, device) -> dict:
    """concentration.json for the checkpoint under ``out`` (also part of pretrain.json for new checkpoints)."""
    setting = checkpoint_setting(out)
    model = checkpoint_model(setting, out, device)
    dtype = autocast_dtype(device)
    record = concentration_record(model, setting, validation_clips(setting, device), dtype)
    with open(os.path.join(out, "concentration.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def save_samples(model, clips, dtype, path: str, name: str, shift: float, at_time=None) -> None:
    """Euler steps (``SAMPLE_STEPS``, moved by the training's time ``shift``) from fixed noise for the validation
    batch (its shape: no new graph); the first clip. ``at_time``: see ``setter_by_time``."""
    noise, _ = step_noise(30_000_000, clips.shape, clips.device, salt=5)
    x = sample(model, noise, SAMPLE_STEPS, dtype, shift=shift, at_time=at_time)
    torch.save({"data": clips[:1].cpu(), name: x[:1].cpu()}, path)


def run_label(arm: Arm, steps: int, checkpoint_steps: int) -> str:
    """The arm's name, with its step count where it fine-tunes longer or shorter than the checkpoint's setting."""
    return arm.name if steps == checkpoint_steps else f"{arm.name}_{steps}steps"


def finetune_arm(arm: Arm, setting: Setting, out: str, seed: int, device, kernel: str, label: str) -> dict:
    """One arm from the checkpoint: calibrate its final p, fine-tune, validate; its record (named ``label``)."""
    dtype = autocast_dtype(device)
    model = checkpoint_model(setting, out, device, arm, kernel)
    clips = validation_clips(setting, device)
    record = {"arm": dataclasses.asdict(arm), "run": label, "finetune_steps": setting.finetune_steps, "seed": seed,
              "kernel_requested": kernel}
    schedule, steps = None, setting.finetune_steps
    if arm.keep is not None:
        schedule, record["kv_threshold"], record["sparsity_at_start"] = calibrated_schedule(
            model, arm, clips, dtype, steps)
    teacher = checkpoint_model(setting, out, device).requires_grad_(False) if arm.distill else None
    start = time.perf_counter()
    losses = train_steps(model, setting, steps, setting.finetune_lr, seed, schedule, teacher=teacher,
                         distill=arm.distill)
    at_time = setter_by_time(schedule, model.attention_layers, steps)  # the ramp's end (at 60% of the steps)
    record.update(wall_s=time.perf_counter() - start, train_loss=losses[::5],
                  **validation_record(model, clips, dtype, at_time))
    record["sparsity_at_end"] = 0.0
    if schedule is not None:
        by_group = sparsity_by_group(model, schedule, clips, dtype, steps)
        record.update(sparsity_at_end=statistics.fmean(by_group), kernel=training_kernel(kernel, setting, device, dtype))
        if len(by_group) > 1:
            record["sparsity_at_end_by_group"] = by_group
    if seed == 0:
        save_samples(model, clips, dtype, os.path.join(out, f"samples_{label}.pt"), label, setting.time_shift, at_time)
    return record


def training_free(setting: Setting, out: str, device, arms, clips: int) -> dict:
    """Each arm's final setting (calibrated p, budget, keep ratio) on the checkpoint with no fine-tuning: the
    validation loss per flow time on the first ``clips`` validation clips, dense first (where a setting costs
    before training adapts to it; cheap enough for a CPU). Writes training_free.json under ``out``."""
    dtype = autocast_dtype(device)
    validation = validation_clips(setting, device)[:clips]
    rows = []
    for arm in [Arm("dense")] + [a for a in arms if a.keep is not None]:
        model = checkpoint_model(setting, out, device, arm)
        row, at_time = {"arm": arm.name, "kv_threshold": None, "sparsity": 0.0}, None
        if arm.keep is not None:
            schedule, row["kv_threshold"], row["sparsity"] = calibrated_schedule(model, arm, validation, dtype, 10)
            at_time = setter_by_time(schedule, model.attention_layers, 10**6)  # the ramp's end at that p
        rows.append({**row, **validation_record(model, validation, dtype, at_time)})
        print(f"{arm.name:>22}: sparsity {row['sparsity']:.3f}, val {rows[-1]['val_loss']:.4f} "
              f"({rows[-1]['val_loss'] / rows[0]['val_loss'] - 1:+.1%}); by time "
              + " ".join(f"{x:.3f}" for x in rows[-1]["val_loss_by_time"]), flush=True)
    record = {"setting": dataclasses.asdict(setting), "environment": environment(device), "clips": clips,
              "validation_times": list(VALIDATION_TIMES), "rows": rows}
    with open(os.path.join(out, "training_free.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def load_arms_file(path: str) -> dict:
    """One arms_seed file, each record given its run label and step count (older files name neither: their
    arms ran the file's setting)."""
    with open(path) as f:
        saved = json.load(f)
    for r in saved["records"]:
        r.setdefault("run", r["arm"]["name"])
        r.setdefault("finetune_steps", saved["setting"]["finetune_steps"])
    twice = sorted(run for run, n in collections.Counter(r["run"] for r in saved["records"]).items() if n > 1)
    if twice:  # a merge that copied a record twice would weight that seed double in the mean and the spread
        raise ValueError(f"{path}: more than one record of run(s) {twice}; one record per run and seed expected")
    return saved


def finetune(setting: Setting, out: str, seed: int, device, arms, kernel: str = "auto",
             steps: int | None = None) -> list[dict]:
    """The arms for one seed, ``steps`` fine-tune steps each (default: the checkpoint's setting), added to
    arms_seed<seed>.json (a run of the same arm and steps replaces its record), the file rewritten after each
    arm (a cut run keeps what it did)."""
    path = os.path.join(out, f"arms_seed{seed}.json")
    run_setting = dataclasses.replace(setting, finetune_steps=steps or setting.finetune_steps)
    labels = {arm.name: run_label(arm, run_setting.finetune_steps, setting.finetune_steps) for arm in arms}
    records = ([r for r in load_arms_file(path)["records"] if r["run"] not in labels.values()]
               if os.path.exists(path) else [])
    for arm in arms:
        records.append(finetune_arm(arm, run_setting, out, seed, device, kernel, labels[arm.name]))
        with open(path, "w") as f:
            json.dump({"setting": dataclasses.asdict(setting), "environment": environment(device),
                       "records": records}, f, indent=1)
        r = records[-1]
        print(f"seed {seed} {labels[arm.name]:>22}: val {r['val_loss']:.4f}, sparsity {r['sparsity_at_end']:.3f}, "
              f"{r['wall_s']:.0f} s", flush=True)
    return records


# ----------------------------------------------------------------------------- the frontier

def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fill_kernel_key(split: dict) -> int | None:
    """What a bench row's or an arm's pruned queries cost the kernel: None for the copy rules (no rows of their
    own, the same kernel whichever they copy), else the extra KV blocks of their local rows (0, 1, ...). Rows
    and arms without a ``fill`` (before 2026-12-06) copied a kept query's output."""
    return split.get("local_extra_kv_blocks", 0) if split.get("fill") == "local" else None


def bench_speedups(paths: list[str]) -> dict:
    """(tokens, keep ratio, :func:`fill_kernel_key`, target sparsity) -> (fwd+bwd speed-up over the best SDPA, the
    bench file), from bench JSONs: FLASH rows where there are any, an earlier file before a later one; {} without
    any."""
    found = {}
    for path in reversed([p for p in paths if os.path.exists(p)]):
        with open(path) as f:
            rows = json.load(f)["rows"]
        for r in sorted(rows, key=lambda r: r["kernel"] == "flash"):  # FLASH rows written last win
            if "speedup_vs_sdpa_fwd_bwd" in r:
                key = r["tokens"], r["query_keep_ratio"], fill_kernel_key(r), round(r["target_sparsity"], 2)
                found[key] = (r["speedup_vs_sdpa_fwd_bwd"], f"{os.path.basename(path)} ({r['kernel']})")
    return found


def split_speedups(arm: dict, speedups: dict, time_shift: float = 1.0) -> tuple[tuple, tuple]:
    """(speed-up, bench file) at 23,296 and at 153,600 tokens of the arm's split, (None, None) where the bench has
    none: an arm whose keep ratio differs by layer (``layer_keep``) has no bench split. A ``high_noise`` arm runs
    each group's split for the share of a sampler's steps in that group (uniform steps moved by ``time_shift``):
    its time is the weighted sum of theirs."""
    if arm.get("layer_keep"):
        return (None, None), (None, None)
    high_noise = arm.get("high_noise") or ()
    keeps = [arm["keep"]] + [keep for _, keep, _ in high_noise]
    # the share of uniform sampler steps u whose shifted time is at or above each boundary, then per group
    above = [1.0] + [1.0 - unshift_time(t0, time_shift) for t0, _, _ in high_noise]
    shares = [a - b for a, b in zip(above, above[1:] + [0.0])]
    found = []
    for tokens in (23296, 153600):
        per_group = [speedups.get((tokens, keep, fill_kernel_key(arm), arm["target"])) for keep in keeps]
        if any(g is None for g in per_group):
            found.append((None, None))
        elif len(keeps) == 1:
            found.append(per_group[0])
        else:
            found.append((1.0 / sum(share / g[0] for share, g in zip(shares, per_group)),
                          ", ".join(f"keep {keep} on {share:.0%} of the steps from {g[1]}"
                                    for keep, share, g in zip(keeps, shares, per_group))))
    return tuple(found)


def frontier_rows(records: list[dict], speedups: dict, time_shift: float = 1.0) -> list[dict]:
    """One fine-tune row per BSA run (arm and step count): loss mean and spread over seeds, gap to the dense arm
    of the same step count, speed-ups of its split (``time_shift``: the sampler's, for a split by flow time)."""
    by_run, dense_by_steps = {}, {}
    for r in records:
        if r["arm"]["keep"] is None:
            dense_by_steps.setdefault(r["finetune_steps"], []).append(r)
        else:
            by_run.setdefault(r["run"], []).append(r)
    rows = []
    for name, runs in by_run.items():
        arm, loss = runs[0]["arm"], mean_std([r["val_loss"] for r in runs])
        dense_runs = dense_by_steps.get(runs[0]["finetune_steps"], [])
        dense = mean_std([r["val_loss"] for r in dense_runs] or [float("nan")])
        small, large = split_speedups(arm, speedups, time_shift)
        rows.append({"regime": "fine-tune", "arm": name, "finetune_steps": runs[0]["finetune_steps"],
                     "query_keep_ratio": arm["keep"], "layer_keep": arm.get("layer_keep", []), "fill": arm["fill"],
                     "high_noise": arm.get("high_noise") or None, "distill": arm.get("distill", 0.0),
                     "windows": arm["windows"] or [[2, 2, 2]], "total_sparsity": arm["target"],
                     "achieved_sparsity_mean": statistics.fmean(r["sparsity_at_end"] for r in runs),
                     "seeds": sorted(r["seed"] for r in runs), "val_loss_mean": loss[0], "val_loss_std": loss[1],
                     "dense_val_loss_mean": dense[0], "dense_val_loss_std": dense[1], "gap": loss[0] / dense[0] - 1,
                     "gap_by_time": gap_by_time(runs, dense_runs),
                     "speedup_23296": small[0], "speedup_153600": large[0],
                     "speedup_of": f"the bench's split at this keep ratio and sparsity (2x2x2 windows, most_similar "
                                   f"fill): 23,296 from {small[1]}, 153,600 from {large[1]}",
                     "kernel": sorted({r.get("kernel", "?") for r in runs})})
    return rows


def gap_by_time(runs: list[dict], dense_runs: list[dict]) -> list[float] | None:
    """Per validation flow time: the runs' mean loss over the dense runs' mean, minus 1; None where a record
    has no losses by time (records before 2026-12-05's third session)."""
    if not dense_runs or not all("val_loss_by_time" in r for r in runs + dense_runs):
        return None
    def mean(records):
        return [statistics.fmean(values) for values in zip(*(r["val_loss_by_time"] for r in records))]

    return [arm / dense - 1 for arm, dense in zip(mean(runs), mean(dense_runs))]


def config_fields(text: str) -> dict:
    """query_keep_ratio, fill and window read back from a record's ``repr(BSAConfig(...))``."""
    keep = re.search(r"query_keep_ratio=([0-9.]+)", text)
    fill = re.search(r"fill='(\w+)'", text)
    window = re.search(r"window=\((\d+), (\d+), (\d+)\)", text)
    if not (keep and fill and window):
        raise ValueError(f"not a BSAConfig repr with query_keep_ratio, fill and window: {text[:120]!r}")
    return {"query_keep_ratio": float(keep[1]), "fill": fill[1], "window": tuple(int(n) for n in window.groups())}


def scratch_rows(folder: str) -> list[dict]:
    """The from-scratch runs of examples/train_video_dit.py (one seed each) that have a full arm of the same run."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "arm_bsa.json"))):
        here = os.path.dirname(path)
        with open(path) as f:
            bsa = json.load(f)
        if os.path.exists(os.path.join(here, "arm_full.json")):
            with open(os.path.join(here, "arm_full.json")) as f:
                full = json.load(f)["val"][-1][1]
        elif os.path.exists(os.path.join(here, "summary.json")):
            with open(os.path.join(here, "summary.json")) as f:
                full = json.load(f)["final_val_loss"]["full"]
        else:
            continue
        sparsity = statistics.fmean(bsa["final_sparsity_per_layer"])
        config = config_fields(bsa["bsa"])
        rows.append({"regime": "scratch", "arm": os.path.basename(here), "query_keep_ratio": config["query_keep_ratio"],
                     "fill": config["fill"], "windows": [list(config["window"])], "total_sparsity": round(sparsity, 3),
                     "achieved_sparsity_mean": sparsity, "seeds": [bsa["setup"]["seed"]],
                     "val_loss_mean": bsa["val"][-1][1], "val_loss_std": None, "dense_val_loss_mean": full,
                     "dense_val_loss_std": None, "gap": bsa["val"][-1][1] / full - 1, "speedup_23296": None,
                     "speedup_153600": None, "kernel": None, "speedup_of": f"not timed (16,384-token runs, {bsa['setup']['steps']} "
                                                           f"steps from scratch)"})
    return rows


def plot_frontier(rows: list[dict], path: str) -> str | None:
    """Validation-loss gap of each fine-tune arm against its total sparsity (left) and against the
    153,600-token fwd+bwd speed-up of its split (right, arms with a bench row); a colour per checkpoint."""
    plt = pyplot_or_none()
    if plt is None:
        return "matplotlib is not installed: no frontier plot"
    fig, (by_sparsity, by_speed) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    fine = [r for r in rows if r["regime"] == "fine-tune"]
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r.get("checkpoint", "") for r in fine))}
    for r in fine:
        marker = "o" if r["query_keep_ratio"] == 1.0 else "s"
        spread = None if r["val_loss_std"] is None else 100 * r["val_loss_std"] / r["dense_val_loss_mean"]
        colour = colours[r.get("checkpoint", "")]
        for ax, x in ((by_sparsity, r["achieved_sparsity_mean"]), (by_speed, r["speedup_153600"])):
            if x is not None:
                ax.errorbar(x, 100 * r["gap"], yerr=spread, marker=marker, capsize=3, color=colour)
                ax.annotate(r["arm"], (x, 100 * r["gap"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, colour in colours.items():
        by_sparsity.plot([], [], color=colour, marker="o", ls="", label=name or "fine-tune")
    for ax in (by_sparsity, by_speed):
        ax.axhline(2.0, color="red", lw=0.8, ls="--", label="+2% (target)" if ax is by_sparsity else None)
        ax.axhline(0.0, color="grey", lw=0.8)
    by_sparsity.set(xlabel="total sparsity (achieved, mean of seeds)", ylabel="validation loss vs dense (%)",
                    title="fine-tune: quality against sparsity")
    by_speed.set(xlabel="fwd+bwd attention speed-up over SDPA of the split at 153,600 tokens",
                 title="quality against speed (circles: KV only, squares: keep 0.5)")
    by_sparsity.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def checkpoint_rows(out: str, speedups: dict) -> tuple[list[dict], list[dict], dict]:
    """The fine-tune rows and records of the checkpoint under ``out`` (each tagged with it), and its facts."""
    records, environments = [], []
    for path in sorted(glob.glob(os.path.join(out, "arms_seed*.json"))):
        saved = load_arms_file(path)
        records += saved["records"]
        environments.append(saved["environment"])
    if not records:
        raise SystemExit(f"no arms_seed*.json under {out}: run finetune first")
    with open(os.path.join(out, "pretrain.json")) as f:
        pretrained = json.load(f)
    name = os.path.basename(os.path.normpath(out))
    setting = recorded_setting(pretrained["setting"])
    rows = [{**row, "checkpoint": name, "scene": setting.scene, "registers": setting.registers,
             "tokens": setting.tokens} for row in frontier_rows(records, speedups, setting.time_shift)]
    kept = [{"checkpoint": name, **{k: r[k] for k in ("arm", "run", "finetune_steps", "seed", "val_loss",
                                                     "sparsity_at_start", "sparsity_at_end", "kv_threshold",
                                                     "wall_s") if k in r}} for r in records]
    facts = {"checkpoint": name, "setting": pretrained["setting"], "pretrain_val_loss": pretrained["val_loss"],
             "environment": environments[0]}
    return rows, kept, facts


def summarize(out: str, bench: str | None, scratch: str, results: str) -> dict:
    """quality_frontier.json, frontier.png and samples.png from the seeds' records under ``out`` (one folder, or
    several comma-separated: one checkpoint each, every arm compared with its own checkpoint's dense arm)."""
    speedups = bench_speedups(bench.split(","))
    rows, records, checkpoints = [], [], []
    for folder in out.split(","):
        folder_rows, folder_records, facts = checkpoint_rows(folder, speedups)
        rows, records, checkpoints = rows + folder_rows, records + folder_records, checkpoints + [facts]
    rows += scratch_rows(scratch)
    first = checkpoints[0]
    summary = {"rows": rows, "environment": first["environment"], "setting": first["setting"],
               "pretrain_val_loss": first["pretrain_val_loss"], "checkpoints": checkpoints, "bench": bench,
               "records": records}
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "quality_frontier.json"), "w") as f:
        json.dump(summary, f, indent=1)
    notes = [plot_frontier(rows, os.path.join(results, "frontier.png")),
             samples_grid(out.split(",")[0], [r for r in rows if r.get("checkpoint") == first["checkpoint"]],
                          results)]
    print(f"{'checkpoint':>28} {'arm':>24} {'keep':>5} {'sparsity':>8} {'val loss':>16} {'gap':>7} {'x23K':>6} "
          f"{'x153K':>6}")
    for r in rows:
        spread = "" if r["val_loss_std"] is None else f"+-{r['val_loss_std']:.4f}"
        print(f"{r.get('checkpoint', r['regime']):>28} {r['arm']:>24} {r['query_keep_ratio']:5.2f} "
              f"{r['achieved_sparsity_mean']:8.3f} {r['val_loss_mean']:.4f}{spread:>9} {r['gap']:+7.2%} "
              f"{r['speedup_23296'] or float('nan'):6.2f} {r['speedup_153600'] or float('nan'):6.2f}")
    for note in filter(None, notes):
        print(note)
    return summary


def samples_grid(out: str, rows: list[dict], results: str) -> str | None:
    """samples.png: data, the pretrained checkpoint, the dense fine-tune and the best bidirectional arm (seed 0)."""
    best = min((r for r in rows if r["regime"] == "fine-tune" and r["query_keep_ratio"] < 1.0),
               key=lambda r: r["gap"], default=None)
    grid = {}
    for name in ("pretrained", "dense", None if best is None else best["arm"]):
        path = os.path.join(out, f"samples_{name}.pt")
        if name is not None and os.path.exists(path):
            grid.update(torch.load(path))
    if not grid:
        return "no samples under --out: no sample grid"
    return plot_samples(grid, os.path.join(results, "frontier_samples.png"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["pretrain", "finetune", "summarize", "concentration", "training-free"])
    parser.add_argument("--out", required=True, help="folder of the checkpoint and the arms' records (summarize: "
                                                     "several, comma-separated, one checkpoint each)")
    parser.add_argument("--seed", type=int, default=0, help="finetune: the seed (data stream and noise)")
    parser.add_argument("--arms", default=None, help="finetune: comma-separated arm names (default: all)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default=None,
                        help="pretrain: the model, data and step counts (default: gpu; the other commands take "
                             "the checkpoint's)")
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke setting on the CPU (= --setting tiny)")
    parser.add_argument("--clips", type=int, default=4, help="training-free: validation clips (1-4)")
    parser.add_argument("--kernel", default="auto", help="finetune: BSAConfig.kernel of the BSA arms")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="finetune: steps per arm (default: the checkpoint's setting); other counts are "
                             "recorded as runs of their own, compared with the dense arm of the same count")
    parser.add_argument("--scene", choices=sorted(SCENES), default=None,
                        help="pretrain: what the clips show (default: the setting's); finetune takes the checkpoint's")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretrain: steps (default: the setting's)")
    parser.add_argument("--registers", type=int, default=None,
                        help="pretrain: register tokens of the model (default: the setting's); the others take the "
                             "checkpoint's")
    parser.add_argument("--time-shift", type=float, default=None,
                        help="pretrain: shift of the training times and sampler steps (default: the setting's); "
                             "finetune takes the checkpoint's")
    parser.add_argument("--bench", default="benchmarks/results/bench-frontier.json",
                        help="summarize: bench JSONs (comma-separated, the first preferred) of `python -m "
                             "bsa_flex.bench --part frontier` or --part wan")
    parser.add_argument("--scratch", default="benchmarks/results/train_video_dit_h200",
                        help="summarize: folder of the from-scratch runs")
    parser.add_argument("--results", default="benchmarks/results", help="summarize: where the frontier goes")
    args = parser.parse_args(argv)
    for flag, value in (("--pretrain-steps", args.pretrain_steps), ("--finetune-steps", args.finetune_steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.registers is not None and args.registers < 0:
        parser.error(f"--registers must be at least 0, got {args.registers}")
    if args.time_shift is not None and not args.time_shift > 0:
        parser.error(f"--time-shift must be positive, got {args.time_shift}")
    by_name = {a.name: a for a in ARMS}
    if args.arms is not None and not set(args.arms.split(",")) <= set(by_name):
        parser.error(f"--arms: unknown names in {args.arms!r}; known: {', '.join(by_name)}")
    arms = ARMS if args.arms is None else [by_name[name] for name in args.arms.split(",")]  # in the order given
    if not 1 <= args.clips <= 4:
        parser.error(f"--clips must be 1 to 4 (the validation clips), got {args.clips}")
    if args.tiny and args.setting not in (None, "tiny"):
        parser.error(f"--tiny is the tiny setting on the CPU; it cannot go with --setting {args.setting}")
    setting = SETTINGS["tiny" if args.tiny else args.setting or "gpu"]
    if args.command == "pretrain":
        setting = dataclasses.replace(setting, scene=args.scene or setting.scene,
                                      pretrain_steps=args.pretrain_steps or setting.pretrain_steps,
                                      time_shift=args.time_shift or setting.time_shift,
                                      registers=setting.registers if args.registers is None else args.registers)
    elif args.command in ("finetune", "training-free"):
        setting = checkpoint_setting(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.command != "summarize":  # summarize only reads --out, which may name several folders
        os.makedirs(args.out, exist_ok=True)
    if args.command == "pretrain":
        print(json.dumps({k: v for k, v in pretrain(setting, args.out, device).items() if k != "train_loss"}))
    elif args.command == "finetune":
        finetune(setting, args.out, args.seed, device, arms, args.kernel, args.finetune_steps)
    elif args.command == "training-free":
        training_free(setting, args.out, device, arms, args.clips)
    elif args.command == "concentration":
        record = measure_concentration(args.out, device)
        for r in record["rows"]:
            print(f"layer {r['layer']} t {r['flow_time']:.1f}: {r['top_kv_block_mass']:.3f} of the mass on the best "
                  f"{r['fraction']:.0%} of KV blocks")
        print(f"mean {record['mean']:.3f}")
    else:
        summarize(args.out, args.bench, args.scratch, args.results)


if __name__ == "__main__":
    main()
