"""Train a small latent-video DiT twice, with full attention and with BSA, on videos it generates.

    python examples/train_video_dit.py            # GPU: 16x32x32 = 16,384 tokens per clip
    python examples/train_video_dit.py --tiny     # CPU smoke run, under a minute
    CUDA_VISIBLE_DEVICES=0 python examples/train_video_dit.py --arm full &   # or the arms on two GPUs
    CUDA_VISIBLE_DEVICES=1 python examples/train_video_dit.py --arm bsa; wait
    python examples/train_video_dit.py --summarize                          # summary of both arms

Both arms share the seed, the initial weights, the data stream and the noise; the BSA arm runs a
SparsitySchedule (dense warm-up, then its final keep ratio and a ramp of the KV threshold). The data
are deterministic synthetic "latent" clips: textured shapes that move, deform and rotate over a
panning textured background, so that denoising a frame profits from other frames far away.
Training is rectified flow (flow matching). After training: validation losses, a training-free
sweep of BSA on q/k/v captured from the trained full-attention model (output error and retained
attention mass per layer), sample clips from both arms, and a JSON summary, under --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import bsa_flex
from bsa_flex import BSAConfig, BSAttention, SparsitySchedule, layer_stats, rope_3d
from bsa_flex.extras import environment, progress, pyplot_or_none
from masks import FILL_POLICIES, token_mask


# ----------------------------------------------------------------------------- data

def make_clips(seeds: list[int], frames: int, height: int, width: int, channels: int, device) -> torch.Tensor:
    """[N, C, T, H, W] latent clips, one per seed, deterministic; about unit variance per channel.

    Each clip: a background texture (plane waves) panned by a camera moving at constant speed,
    and three elliptic shapes with striped textures that travel, rotate and pulse in size.
    """
    clips = []
    t = torch.linspace(0, 1, frames, device=device)[:, None, None]
    y = torch.linspace(-1, 1, height, device=device)[None, :, None]
    x = torch.linspace(-1, 1, width, device=device)[None, None, :]
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, lo=-1.0, hi=1.0):
            return (lo + (hi - lo) * torch.rand(*shape, generator=g)).to(device)

        pan = rand(2, lo=-0.8, hi=0.8)
        bx, by = x - pan[0] * t, y - pan[1] * t  # camera pan moves the whole background
        wave = rand(4, 2, lo=-6.0, hi=6.0)
        phase = rand(4, lo=0.0, hi=2 * math.pi)
        colour_bg = rand(4, channels) * 0.5
        clip = sum(torch.cos(wave[i, 0] * math.pi * bx + wave[i, 1] * math.pi * by + phase[i])[None]
                   * colour_bg[i][:, None, None, None] for i in range(4))
        for _ in range(3):
            start, velocity = rand(2, lo=-0.6, hi=0.6), rand(2, lo=-0.9, hi=0.9)
            radius, pulse = rand(2, lo=0.15, hi=0.45), rand(1, lo=1.0, hi=4.0)
            spin, stripes = rand(1, lo=-3.0, hi=3.0), rand(1, lo=4.0, hi=12.0)
            colour = rand(channels) * 1.5
            cx = start[0] + velocity[0] * t - pan[0] * t
            cy = start[1] + velocity[1] * t - pan[1] * t
            angle = spin * t * math.pi
            dx, dy = x - cx, y - cy
            u = dx * torch.cos(angle) + dy * torch.sin(angle)
            w = -dx * torch.sin(angle) + dy * torch.cos(angle)
            size = 1.0 + 0.3 * torch.sin(2 * math.pi * pulse * t)
            inside = torch.sigmoid((1.0 - (u / (radius[0] * size)) ** 2 - (w / (radius[1] * size)) ** 2) * 12.0)
            texture = torch.cos(stripes * math.pi * u) * 0.5 + 0.75
            clip = clip * (1 - inside[None]) + (inside * texture)[None] * colour[:, None, None, None]
        clips.append(clip)
    clips = torch.stack(clips)
    return (clips - clips.mean((2, 3, 4), keepdim=True)) / clips.std((2, 3, 4), keepdim=True).clamp_min(1e-3)


# ----------------------------------------------------------------------------- model

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] flow time in [0, 1] -> [N, dim] sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * 1000.0 * freqs
    return torch.cat([angles.cos(), angles.sin()], -1)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: BSAttention and an MLP, both modulated by the time embedding."""

    def __init__(self, width: int, heads: int, bsa: BSAConfig | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = BSAttention(width, heads, bsa=bsa, rope=rope_3d)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, c, video_shape):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, -1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, video_shape)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class VideoDiT(nn.Module):
    """Patchified latent-video DiT predicting the flow velocity: [N, C, T, H, W] -> same shape."""

    def __init__(self, channels: int, patch: tuple[int, int, int], width: int, layers: int, heads: int,
                 bsa: BSAConfig | None):
        super().__init__()
        self.patch = patch
        patch_dim = channels * math.prod(patch)
        self.embed = nn.Linear(patch_dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([DiTBlock(width, heads, bsa) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.head = nn.Linear(width, patch_dim)
        for layer in (self.final_modulation, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def attention_layers(self) -> list[BSAttention]:
        return [block.attn for block in self.blocks]

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch
        N, C, T, H, W = latents.shape
        video_shape = (T // pt, H // ph, W // pw)
        x = self.embed(rearrange(latents, "n c (t a) (h b) (w e) -> n (t h w) (c a b e)", a=pt, b=ph, e=pw))
        c = self.time(timestep_embedding(t, x.shape[-1]))
        for block in self.blocks:
            x = block(x, c, video_shape)
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, -1)
        x = self.head(self.norm(x) * (1 + scale) + shift)
        return rearrange(x, "n (t h w) (c a b e) -> n c (t a) (h b) (w e)", t=video_shape[0], h=video_shape[1],
                         a=pt, b=ph, e=pw)


# ----------------------------------------------------------------------------- flow matching

def flow_loss(model: nn.Module, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t eps, predict the velocity eps - x0 (mean squared error)."""
    tt = t[:, None, None, None, None]
    noisy = (1 - tt) * clean + tt * noise
    return F.mse_loss(model(noisy, t).float(), (noise - clean).float())


def step_noise(step: int, batch_shape, device, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and flow times of one step: the same in both arms (logit-normal t, as in SD3)."""
    g = torch.Generator(device=device).manual_seed(1_000_003 * step + salt)
    noise = torch.randn(batch_shape, generator=g, device=device)
    t = torch.sigmoid(torch.randn(batch_shape[0], generator=g, device=device))
    return noise, t


@torch.no_grad()
def validation_loss(model: nn.Module, clips: torch.Tensor, dtype) -> float:
    """Mean flow loss over the held-out clips at 8 fixed flow times with fixed noise."""
    losses = []
    for i, t_value in enumerate(torch.linspace(0.05, 0.95, 8).tolist()):
        noise, _ = step_noise(10_000_000 + i, clips.shape, clips.device, salt=7)
        t = torch.full((clips.shape[0],), t_value, device=clips.device)
        with torch.autocast(clips.device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses.append(float(flow_loss(model, clips, noise, t)))
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, steps: int, dtype) -> torch.Tensor:
    """Euler integration of the learned flow from t = 1 (noise) to t = 0 (data)."""
    x = noise.clone()
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps, device=x.device)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = x - model(x, t).float() / steps
    return x


# ----------------------------------------------------------------------------- one arm

def train_arm(name: str, args, bsa: BSAConfig | None, schedule: SparsitySchedule | None, val_clips, device) -> dict:
    """Train one arm; return its curves, timings, sparsity record and the model."""
    torch.manual_seed(args.seed)  # the same initial weights in both arms
    model = VideoDiT(args.channels, args.patch, args.width, args.layers, args.heads, bsa).to(device)
    runner = torch.compile(model, dynamic=False) if args.compile else model
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    record = {"arm": name, "train_loss": [], "val": [], "sparsity": [], "step_ms": []}
    bar = progress(args.steps, name, quiet_without_tqdm=True)
    for step in range(args.steps):
        if schedule is not None:
            schedule.apply(model.attention_layers, step)
        if step % args.val_every == 0:
            record["val"].append((step, validation_loss(runner, val_clips, dtype)))
        clean = make_clips([args.seed * 100_000 + step * args.batch + i for i in range(args.batch)],
                           *args.latent, args.channels, device)
        noise, t = step_noise(step, clean.shape, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = flow_loss(runner, clean, noise, t)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["step_ms"].append((time.perf_counter() - start) * 1e3)
        record["train_loss"].append(float(loss.detach()))
        if schedule is not None and step % args.log_every == 0:
            rows = layer_stats(model.attention_layers)
            record["sparsity"].append((step, [r["sparsity"] for r in rows], [r["kept_query_fraction"] for r in rows]))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss'][-1]:.4f}")
    if bar is not None:
        bar.close()
    record["val"].append((args.steps, validation_loss(runner, val_clips, dtype)))
    if schedule is not None:
        rows = layer_stats(model.attention_layers)
        record["final_sparsity_per_layer"] = [r["sparsity"] for r in rows]
    warm = record["step_ms"][min(len(record["step_ms"]) - 1, args.steps // 2):]  # after compiles and warm-up
    record["step_ms_median_second_half"] = sorted(warm)[len(warm) // 2]
    return record, model


# ----------------------------------------------------------------------------- training-free check

@torch.no_grad()
def captured_qkv(model: VideoDiT, clips: torch.Tensor, t_value: float, dtype) -> list[tuple]:
    """(q, k, v, video_shape) of every attention layer of ``model`` on noised ``clips`` at one flow time."""
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: captured.append((*m.project(*a), a[1])))
             for layer in model.attention_layers]
    noise, _ = step_noise(20_000_000, clips.shape, clips.device, salt=3)
    t = torch.full((clips.shape[0],), t_value, device=clips.device)
    try:
        with torch.autocast(clips.device.type, dtype=dtype, enabled=dtype != torch.float32):
            model((1 - t_value) * clips + t_value * noise, t)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def retained_mass(q, k, selection, layout, scale: float) -> float:
    """Mean over tokens of the full-attention probability on the keys its output was computed from."""
    total, count = 0.0, 0
    for h in range(q.shape[1]):
        probs = torch.softmax(q[:, h:h + 1].float() @ k[:, h:h + 1].float().transpose(-1, -2) * scale, -1)
        head = type(selection)(*(x[:, h:h + 1] for x in selection))
        mask = token_mask(head, layout)  # [B, 1, S, S] rows of kept queries
        source = head.kept_token.gather(2, head.fill_source)  # token whose keys each token's output used
        used = mask.gather(2, source[..., None].expand(-1, -1, -1, mask.shape[-1]))
        total += float((probs * used).sum())
        count += probs.shape[0] * probs.shape[2]
        del probs, mask, used
    return total / count


@torch.no_grad()
def training_free_sweep(model: VideoDiT, clips: torch.Tensor, block_size: int, dtype, keeps=(1.0, 0.75, 0.5),
                        thresholds=(0.8, 0.9, 0.95)) -> list[dict]:
    """BSA on q/k/v of the trained full model, per layer: output error vs full attention and retained mass."""
    rows = []
    for layer, (q, k, v, video_shape) in enumerate(captured_qkv(model, clips, 0.5, dtype)):
        q, k, v = q.float(), k.float(), v.float()
        full = F.scaled_dot_product_attention(q, k, v)
        for keep in keeps:
            for threshold in thresholds:
                config = BSAConfig(query_keep_ratio=keep, kv_threshold=threshold, block_size=block_size)
                out, stats = bsa_flex.attention(q, k, v, video_shape, config, return_stats=True)
                rows.append({"layer": layer, "keep": keep, "threshold": threshold,
                             "sparsity": float(stats.sparsity),
                             "rel_l2": float((out - full).norm() / full.norm()),
                             "retained_mass": retained_mass(q, k, stats.selection, stats.layout, q.shape[-1] ** -0.5)})
    return rows


# ----------------------------------------------------------------------------- reports

def plot_losses(records: list[dict], path: str) -> str | None:
    plt = pyplot_or_none()
    if plt is None:
        return "matplotlib is not installed (pip install 'bsa-flex[bench]'): no plots written"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for record in records:
        losses = record["train_loss"]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        axes[0].plot(smooth, label=record["arm"])
        steps, values = zip(*record["val"])
        axes[1].plot(steps, values, marker="o", label=record["arm"])
    axes[0].set(title="training loss (moving mean)", xlabel="step", yscale="log")
    axes[1].set(title="validation loss", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_samples(rows: dict[str, torch.Tensor], path: str, frames: int = 6) -> str | None:
    """A grid: one row per source (data, each arm), ``frames`` frames of the first clip, channels 0-2 as RGB."""
    plt = pyplot_or_none()
    if plt is None:
        return "matplotlib is not installed: no sample grid written"
    frames = min(frames, next(iter(rows.values())).shape[2])
    fig, axes = plt.subplots(len(rows), frames, figsize=(1.6 * frames, 1.7 * len(rows)), squeeze=False)
    for r, (name, clip) in enumerate(rows.items()):
        video = clip[0, :3].float().cpu()
        video = (video - video.amin()) / (video.amax() - video.amin()).clamp_min(1e-6)
        picks = torch.linspace(0, video.shape[1] - 1, frames).round().long()
        for c, f in enumerate(picks.tolist()):
            axes[r, c].imshow(video[:, f].permute(1, 2, 0).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(name)
            if r == 0:
                axes[r, c].set_title(f"frame {f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def draw_plots(out: str, records: list[dict], samples: dict) -> list[str]:
    """loss.png and samples.png under ``out``; returns the notes of plots that could not be drawn."""
    notes = [plot_losses(records, os.path.join(out, "loss.png")),
             plot_samples(samples, os.path.join(out, "samples.png")) if samples else "no samples: no sample grid"]
    return [n for n in notes if n]


# ----------------------------------------------------------------------------- main

@dataclasses.dataclass
class Preset:
    latent: tuple[int, int, int]
    patch: tuple[int, int, int]
    channels: int
    width: int
    layers: int
    heads: int
    batch: int
    steps: int
    block_size: int
    lr: float
    final_keep: float  # the BSA arm's final query keep ratio
    kv_budget: float | None  # the BSA arm's KV block budget per query block, as a fraction of the KV blocks


PRESETS = {
    # 16 x 64 x 64 latents, 1x2x2 patches: 16 x 32 x 32 = 16,384 tokens per clip. BSA: every query kept,
    # 12 of 128 KV blocks at most (sparsity 0.905): the setting that matched full attention on H200s
    # (benchmarks/results/train_video_dit_h200); dropping queries (keep 0.75 or 0.5) did not.
    "gpu": Preset(latent=(16, 64, 64), patch=(1, 2, 2), channels=4, width=384, layers=6, heads=6, batch=2,
                  steps=1000, block_size=128, lr=3e-4, final_keep=1.0, kv_budget=0.095),
    # 4 x 16 x 16 latents: 4 x 8 x 8 = 256 tokens, for a CPU smoke run (keep 0.5 exercises the query side)
    "tiny": Preset(latent=(4, 16, 16), patch=(1, 2, 2), channels=4, width=64, layers=2, heads=2, batch=2,
                   steps=24, block_size=16, lr=1e-3, final_keep=0.5, kv_budget=None),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 256 tokens, 2 layers, 24 steps per arm")
    parser.add_argument("--steps", type=int, help="training steps per arm (default: preset)")
    parser.add_argument("--layers", type=int, help="DiT depth (default: preset)")
    parser.add_argument("--width", type=int, help="DiT width (default: preset)")
    parser.add_argument("--latent", type=int, nargs=3, metavar=("T", "H", "W"),
                        help="latent clip size; 1x2x2 patches make (T, H/2, W/2) tokens (default: preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--final-keep", type=float, help="BSA arm: final query keep ratio (default: preset)")
    parser.add_argument("--final-threshold", type=float, default=0.9, help="BSA arm: final KV threshold p")
    parser.add_argument("--fill", choices=FILL_POLICIES, default="most_similar",
                        help="BSA arm: which kept query's output a pruned query copies")
    parser.add_argument("--max-kv-blocks", type=int, default=None,
                        help="BSA arm: KV block budget per query block (default: 9.5%% of the KV blocks on the "
                             "GPU preset, none on --tiny)")
    parser.add_argument("--warmup", type=float, default=0.1, help="BSA arm: fraction of steps dense")
    parser.add_argument("--ramp", type=float, default=0.3, help="BSA arm: fraction of steps ramping to the final values")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the whole model (default off: bsa_flex compiles its attention "
                             "graph itself; whole-model graphs cost one compile per kept count and grad mode)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/train_video_dit[_tiny])")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--arm", choices=["both", "full", "bsa"], default="both",
                        help="train one arm only (e.g. each on its own GPU, into the same --out); "
                             "the summary is written once both arms' files are there")
    parser.add_argument("--summarize", action="store_true",
                        help="only write summary.json and the PNGs from the arm files in --out")
    args = parser.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "gpu"]
    for name, value in dataclasses.asdict(preset).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.latent, args.patch = tuple(args.latent), tuple(args.patch)
    if args.steps < 2 or args.layers < 1 or args.width % args.heads:
        parser.error("--steps must be >= 2, --layers >= 1, and --width divisible by the head count")
    if any(n < p or n % p for n, p in zip(args.latent, args.patch)):
        parser.error(f"--latent sizes must be positive multiples of the patch {args.patch}, got {args.latent}")
    if not (0 < args.final_keep <= 1 and 0 < args.final_threshold <= 1):
        parser.error("--final-keep and --final-threshold must lie in (0, 1]")
    if args.warmup < 0 or args.ramp < 0 or args.warmup + args.ramp > 1:
        parser.error("--warmup and --ramp are fractions of the steps; their sum must be at most 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.device = device
    args.out = args.out or os.path.join("benchmarks", "results", "train_video_dit" + ("_tiny" if args.tiny else ""))
    args.val_every = max(1, args.steps // 10)
    args.log_every = max(1, args.steps // 50)
    tokens = math.prod(n // p for n, p in zip(args.latent, args.patch))
    if args.max_kv_blocks is None and args.kv_budget is not None:
        args.max_kv_blocks = max(1, int(args.kv_budget * tokens / args.block_size))
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.out)
    # one whole-model graph per (kept count or dense) x (train or eval): above dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bsa_flex.BSARecompileWarning)
        summary = run(args)
    compiles = sum(issubclass(w.category, bsa_flex.BSARecompileWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, bsa_flex.BSARecompileWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(f"bsa_flex compiled its attention graph {compiles + 1} times (one per shape, grad mode and kept count; "
          f"BSARecompileWarning each time after the first)")
    return summary


def save_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def setup_record(args) -> dict:
    """What both arms must share for their comparison to mean anything."""
    return {"tokens_per_clip": math.prod(n // p for n, p in zip(args.latent, args.patch)),
            "latent": args.latent, "patch": args.patch, "width": args.width, "layers": args.layers,
            "heads": args.heads, "batch": args.batch, "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "compile": args.compile}


def run_arm(name: str, args) -> dict:
    """Train one arm, sample from it (and sweep BSA training-free on the full arm); write arm_<name>.json."""
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    val_clips = make_clips([900_000 + i for i in range(4)], *args.latent, args.channels, device)
    bsa = schedule = None
    if name == "bsa":
        bsa = BSAConfig(query_keep_ratio=args.final_keep, kv_threshold=args.final_threshold,
                        block_size=args.block_size, max_kv_blocks=args.max_kv_blocks, fill=args.fill)
        # The threshold ramps in stairs at no cost (a tensor updated in place); each keep ratio
        # compiles one graph per grad mode (about 20 s each on an H200 since the sort fix; 1.5 min
        # before), so the keep ratio goes to its final value in one step when the warm-up ends.
        ramp_steps = int(args.ramp * args.steps)
        schedule = SparsitySchedule(final_keep_ratio=args.final_keep, final_kv_threshold=args.final_threshold,
                                    dense_steps=int(args.warmup * args.steps), ramp_steps=ramp_steps,
                                    every=max(1, ramp_steps // 10), start_keep_ratio=args.final_keep)
    record, model = train_arm(name, args, bsa, schedule, val_clips, device)
    record.update(environment=environment(device), setup=setup_record(args),
                  bsa=repr(bsa), schedule=repr(schedule))
    if name == "full":
        record["training_free"] = training_free_sweep(model, val_clips[:1], args.block_size, dtype,
                                                      keeps=(1.0, 0.5) if args.tiny else (1.0, 0.75, 0.5))
    noise, _ = step_noise(30_000_000, val_clips.shape, device, salt=5)  # the validation batch: no new graph
    torch.save({"data": val_clips[:1].cpu(), name: sample(model, noise, 20, dtype)[:1].cpu()},
               os.path.join(args.out, f"samples_{name}.pt"))
    save_json(os.path.join(args.out, f"arm_{name}.json"), record)
    return record


def summarize(out: str) -> dict:
    """summary.json, loss.png and samples.png from the two arms' files under ``out``; prints the table."""
    records = {}
    for arm in ("full", "bsa"):
        path = os.path.join(out, f"arm_{arm}.json")
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: run that arm first (--arm {arm})")
        with open(path) as f:
            records[arm] = json.load(f)
    full, sparse = records["full"], records["bsa"]
    if full["setup"] != sparse["setup"]:
        raise SystemExit(f"the arms under {out} were trained with different setups: "
                         f"{full['setup']} vs {sparse['setup']}")
    samples, notes = {}, []
    for arm in ("full", "bsa"):
        path = os.path.join(out, f"samples_{arm}.pt")
        if os.path.exists(path):
            samples.update(torch.load(path))
        else:
            notes.append(f"{path} is missing: the sample grid leaves that arm out")
    samples = {name: samples[name] for name in ("data", "full", "bsa") if name in samples}
    torch.save(samples, os.path.join(out, "samples.pt"))
    notes += draw_plots(out, [full, sparse], samples)
    steps, layers = full["setup"]["steps"], full["setup"]["layers"]
    tail = max(1, steps // 10)
    final_full, final_bsa = full["val"][-1][1], sparse["val"][-1][1]
    same_device = full["environment"]["device_id"] == sparse["environment"]["device_id"]
    summary = {
        "environment": {arm: r["environment"] for arm, r in records.items()},
        "step_times_comparable": same_device,
        "setup": full["setup"], "bsa": sparse["bsa"], "schedule": sparse["schedule"],
        "final_val_loss": {"full": final_full, "bsa": final_bsa},
        "val_loss_gap": final_bsa / final_full - 1.0,
        "final_train_loss_mean_last_10pct": {arm: sum(r["train_loss"][-tail:]) / tail for arm, r in records.items()},
        "bsa_final_sparsity_per_layer": sparse["final_sparsity_per_layer"],
        "bsa_final_sparsity_mean": sum(sparse["final_sparsity_per_layer"]) / layers,
        "step_ms_median_second_half": {arm: r["step_ms_median_second_half"] for arm, r in records.items()},
        "training_free": full["training_free"],
        "curves": {arm: {"train_loss": r["train_loss"], "val": r["val"], "sparsity": r["sparsity"]}
                   for arm, r in records.items()},
        "notes": notes,
    }
    save_json(os.path.join(out, "summary.json"), summary)
    env = full["environment"]
    print(f"card {env['card']}, torch {env['torch']}, {full['setup']['tokens_per_clip']:,} tokens per clip, "
          f"{steps} steps per arm")
    print(f"{'arm':>5} {'final val loss':>15} {'step ms':>8} {'sparsity':>8}")
    print(f"{'full':>5} {final_full:15.5f} {full['step_ms_median_second_half']:8.1f} {0.0:8.3f}")
    print(f"{'bsa':>5} {final_bsa:15.5f} {sparse['step_ms_median_second_half']:8.1f} "
          f"{summary['bsa_final_sparsity_mean']:8.3f}")
    if not same_device:
        print("step times: the arms ran on different devices (same model of card); compare them with care")
    print(f"BSA validation loss vs full: {summary['val_loss_gap']:+.2%} (target: within 2%)")
    for note in notes:
        print(note)
    return summary


def run(args) -> dict | None:
    """The chosen arms, then the summary once both arms' files are under --out."""
    os.makedirs(args.out, exist_ok=True)
    for arm in ("full", "bsa") if args.arm == "both" else (args.arm,):
        run_arm(arm, args)
    if all(os.path.exists(os.path.join(args.out, f"arm_{arm}.json")) for arm in ("full", "bsa")):
        return summarize(args.out)
    print(f"arm {args.arm} written under {args.out}; run the other arm into the same --out for the summary")
    return None


if __name__ == "__main__":
    main()
    sys.exit(0)
