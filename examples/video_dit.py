"""The pieces of the training example that a user can import: synthetic latent-video clips, a small
video DiT (adaLN, 3D RoPE, BSAttention), rectified-flow loss and sampling, the training-free
measurements of BSA on captured q/k/v, and the report plots. ``train_video_dit.py`` composes them.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import bsa_flex
from bsa_flex import BSAConfig, BSAttention, rope_3d
from bsa_flex.extras import pyplot_or_none
from masks import tile_layout, token_mask

# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class Scene:
    """What a synthetic clip shows: a background of plane waves panned by the camera, and moving shapes."""

    waves: int  # plane waves summed into the background texture
    wave_frequency: float  # their largest spatial frequency (cycles over the frame's half-width, times 2)
    background: float  # the background colours' scale (shapes' colours are up to 1.5)
    shapes: int
    radius: tuple[float, float]  # the shapes' half-axes, as fractions of the frame's half-size
    stripes: bool  # striped shapes, or flat colour


SCENES = {
    # a busy background texture and three striped shapes: hard for a small DiT (after 3,000 steps
    # at 8,192 tokens its samples were still textured noise)
    "textured": Scene(waves=4, wave_frequency=6.0, background=0.5, shapes=3, radius=(0.15, 0.45), stripes=True),
    # a faint, slow background and two larger flat shapes: the shapes dominate what is learned
    "plain": Scene(waves=1, wave_frequency=1.0, background=0.2, shapes=2, radius=(0.3, 0.5), stripes=False),
    # six small flat shapes on a fainter background: each token's context is its own shape's path through
    # space-time, a few tiles, not the frame (the plain scene's large shapes made attention diffuse)
    "sprites": Scene(waves=1, wave_frequency=1.0, background=0.1, shapes=6, radius=(0.1, 0.2), stripes=False),
    # the same with striped shapes: fine detail that only nearby tokens can predict
    "sprites_striped": Scene(waves=1, wave_frequency=1.0, background=0.1, shapes=6, radius=(0.1, 0.2),
                             stripes=True),
}


def make_clips(seeds: list[int], frames: int, height: int, width: int, channels: int, device,
               scene: str = "textured") -> torch.Tensor:
    """[N, C, T, H, W] latent clips, one per seed, deterministic; about unit variance per channel.

    Each clip (``SCENES[scene]``): a background texture (plane waves) panned by a camera moving at
    constant speed, and elliptic shapes that travel, rotate and pulse in size.
    """
    look = SCENES[scene]
    t = torch.linspace(0, 1, frames, device=device)[:, None, None]
    y = torch.linspace(-1, 1, height, device=device)[None, :, None]
    x = torch.linspace(-1, 1, width, device=device)[None, None, :]
    clips = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, lo=-1.0, hi=1.0):
            return (lo + (hi - lo) * torch.rand(*shape, generator=g)).to(device)

        pan = rand(2, lo=-0.8, hi=0.8)
        clip = _background(rand, look, x - pan[0] * t, y - pan[1] * t, channels)  # the camera pans it
        for _ in range(look.shapes):
            clip = _add_shape(clip, rand, look, t, x, y, pan, channels)
        clips.append(clip)
    clips = torch.stack(clips)
    return (clips - clips.mean((2, 3, 4), keepdim=True)) / clips.std((2, 3, 4), keepdim=True).clamp_min(1e-3)


def _background(rand, look: Scene, bx, by, channels: int) -> torch.Tensor:
    """[C, T, H, W] sum of plane waves at the panned coordinates, one random colour each."""
    wave = rand(look.waves, 2, lo=-look.wave_frequency, hi=look.wave_frequency)
    phase = rand(look.waves, lo=0.0, hi=2 * math.pi)
    colour = rand(look.waves, channels) * look.background
    return sum(torch.cos(wave[i, 0] * math.pi * bx + wave[i, 1] * math.pi * by + phase[i])[None]
               * colour[i][:, None, None, None] for i in range(look.waves))


def _add_shape(clip, rand, look: Scene, t, x, y, pan, channels: int) -> torch.Tensor:
    """The clip with one more elliptic shape over it: travelling, spinning, pulsing."""
    start, velocity = rand(2, lo=-0.6, hi=0.6), rand(2, lo=-0.9, hi=0.9)
    radius, pulse = rand(2, lo=look.radius[0], hi=look.radius[1]), rand(1, lo=1.0, hi=4.0)
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
    texture = torch.cos(stripes * math.pi * u) * 0.5 + 0.75 if look.stripes else torch.ones_like(u)
    return clip * (1 - inside[None]) + (inside * texture)[None] * colour[:, None, None, None]


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

    def forward(self, x, c, video_shape, registers: int = 0):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, -1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, video_shape, prefix_tokens=registers)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class VideoDiT(nn.Module):
    """Patchified latent-video DiT predicting the flow velocity: [N, C, T, H, W] -> same shape.

    registers: learned tokens put before the video's in every attention layer (BSA's non-video tokens:
    they attend to every key and every query attends to them), dropped at the end; a channel for what
    the whole clip shares (a sparse layer's queries see only their selected KV blocks besides them).
    """

    def __init__(self, channels: int, patch: tuple[int, int, int], width: int, layers: int, heads: int,
                 bsa: BSAConfig | None, registers: int = 0):
        super().__init__()
        if not isinstance(registers, int) or registers < 0:
            raise ValueError(f"registers must be an int >= 0 (learned tokens before the video's), got {registers!r}")
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
        # drawn last, so that a model with registers starts from the same other weights as one without
        self.registers = nn.Parameter(torch.randn(registers, width) * 0.02) if registers else None

    @property
    def attention_layers(self) -> list[BSAttention]:
        return [block.attn for block in self.blocks]

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch
        N, C, T, H, W = latents.shape
        video_shape = (T // pt, H // ph, W // pw)
        x = self.embed(rearrange(latents, "n c (t a) (h b) (w e) -> n (t h w) (c a b e)", a=pt, b=ph, e=pw))
        c = self.time(timestep_embedding(t, x.shape[-1]))
        registers = 0 if self.registers is None else self.registers.shape[0]
        if registers:
            x = torch.cat([self.registers.to(x.dtype).expand(N, -1, -1), x], 1)
        for block in self.blocks:
            x = block(x, c, video_shape, registers)
        x = x[:, registers:]
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, -1)
        x = self.head(self.norm(x) * (1 + scale) + shift)
        return rearrange(x, "n (t h w) (c a b e) -> n c (t a) (h b) (w e)", t=video_shape[0], h=video_shape[1],
                         a=pt, b=ph, e=pw)


# ----------------------------------------------------------------------------- flow matching

def autocast_dtype(device) -> torch.dtype:
    """The dtype the examples train and evaluate in: bfloat16 (autocast) on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def flow_loss(model: nn.Module, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              rows: torch.Tensor | None = None, teacher: nn.Module | None = None,
              distill: float = 0.0) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t eps, predict the velocity eps - x0 (mean squared error).
    ``rows`` ([N] bool): the batch's mean counting those samples' errors only (the others' count 0).
    ``teacher``: a model whose velocity at x_t (no gradient) replaces that share ``distill`` of the target
    (self-distillation: the dense model's estimate of E[eps - x0 | x_t] instead of one draw of it)."""
    tt = t[:, None, None, None, None]
    noisy = (1 - tt) * clean + tt * noise
    prediction, target = model(noisy, t).float(), (noise - clean).float()
    if teacher is not None and distill > 0.0:
        with torch.no_grad():
            target = torch.lerp(target, teacher(noisy, t).float(), distill)
    if rows is None:
        return F.mse_loss(prediction, target)
    per_sample = (prediction - target).square().flatten(1).mean(1)
    return torch.where(rows, per_sample, 0.0).sum() / rows.numel()


def train_step(model: nn.Module, optimiser, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, dtype,
               runner: nn.Module | None = None, groups=None, teacher: nn.Module | None = None,
               distill: float = 0.0) -> torch.Tensor:
    """One optimiser step of flow matching (autocast to ``dtype``, gradient norm clipped at 1); the loss.
    ``runner``: what computes the forward (e.g. the compiled model), default ``model``. ``groups``:
    (set_up, rows) pairs: the whole batch runs once per pair after ``set_up()`` (e.g. the sparsity of a
    ``FlowTimeSplit`` group), its loss counting ``rows`` only, so that every run keeps the batch's shape
    (no graph per group size); the gradients add up. Default: one run counting every sample.
    ``teacher``, ``distill``: see ``flow_loss``."""
    optimiser.zero_grad(set_to_none=True)
    total = torch.zeros((), device=clean.device)
    for set_up, rows in [(None, None)] if groups is None else groups:
        if set_up is not None:
            set_up()
        with torch.autocast(clean.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = flow_loss(model if runner is None else runner, clean, noise, t, rows, teacher, distill)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()
    return total


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow times moved toward the noise end, s t / (1 + (s - 1) t) (SD3's and Wan's time shift); s = 1: t.

    A clip of many tokens still shows where its objects are at noise levels where a small image is noise
    already, so its layout is decided near t = 1, where an unshifted logit-normal draw rarely trains."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t, shift: float):
    """The time ``shift_time`` moves to ``t``: t / (s - (s - 1) t)."""
    return t / (shift - (shift - 1) * t)


def step_noise(step: int, batch_shape, device, salt: int = 0, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and flow times of one step: the same in every arm (logit-normal t, as in SD3, then
    ``shift_time``)."""
    g = torch.Generator(device=device).manual_seed(1_000_003 * step + salt)
    noise = torch.randn(batch_shape, generator=g, device=device)
    t = shift_time(torch.sigmoid(torch.randn(batch_shape[0], generator=g, device=device)), shift)
    return noise, t


VALIDATION_TIMES = tuple(torch.linspace(0.05, 0.95, 8).tolist())


@torch.no_grad()
def validation_losses(model: nn.Module, clips: torch.Tensor, dtype, at_time=None) -> list[float]:
    """Flow loss over the held-out clips at each of ``VALIDATION_TIMES``, with fixed noise per time;
    ``at_time(t)`` (e.g. a FlowTimeSplit's setting for t) is called before each time's forward."""
    losses = []
    for i, t_value in enumerate(VALIDATION_TIMES):
        if at_time is not None:
            at_time(t_value)
        noise, _ = step_noise(10_000_000 + i, clips.shape, clips.device, salt=7)
        t = torch.full((clips.shape[0],), t_value, device=clips.device)
        with torch.autocast(clips.device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses.append(float(flow_loss(model, clips, noise, t)))
    return losses


def validation_loss(model: nn.Module, clips: torch.Tensor, dtype) -> float:
    """Mean flow loss over the held-out clips at 8 fixed flow times with fixed noise."""
    losses = validation_losses(model, clips, dtype)
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, steps: int, dtype, shift: float = 1.0,
           at_time=None) -> torch.Tensor:
    """Euler integration of the learned flow from t = 1 (noise) to t = 0 (data), on ``steps`` uniform steps
    moved by ``shift_time`` (the shift the model was trained with: more steps where it decides the layout);
    ``at_time(t)`` is called before each step's forward."""
    times = shift_time(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    x = noise.clone()
    for t_now, t_next in zip(times[:-1], times[1:]):
        if at_time is not None:
            at_time(t_now)
        t = torch.full((x.shape[0],), t_now, device=x.device)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = x + (t_next - t_now) * model(x, t).float()
    return x


# ----------------------------------------------------------------------------- training-free check

@torch.no_grad()
def captured_qkv(model: VideoDiT, clips: torch.Tensor, t_value: float, dtype) -> list[tuple]:
    """(q, k, v, video_shape) of every attention layer of ``model`` on noised ``clips`` at one flow time, the
    video tokens' only (the registers' dropped)."""
    captured = []

    def capture(layer, args, kwargs):
        x, video_shape = args
        registers = kwargs.get("prefix_tokens", 0)
        captured.append((*(t[:, :, registers:] for t in layer.project(x, video_shape, (registers, 0))), video_shape))

    hooks = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.attention_layers]
    noise, _ = step_noise(20_000_000, clips.shape, clips.device, salt=3)
    t = torch.full((clips.shape[0],), t_value, device=clips.device)
    try:
        with torch.autocast(clips.device.type, dtype=dtype, enabled=dtype != torch.float32):
            model((1 - t_value) * clips + t_value * noise, t)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _retained_mass_sum(probs, head, layout) -> float:
    """Sum over tokens of the full-attention probability [B, 1, S, S] on the keys its output was computed from."""
    mask = token_mask(head, layout)  # [B, 1, S, S] rows of kept queries
    source = head.kept_token.gather(2, head.fill_source)  # token whose keys each token's output used
    used = mask.gather(2, source[..., None].expand(-1, -1, -1, mask.shape[-1]))
    return float((probs * used).sum())


def mass_per_kv_block(probs: torch.Tensor, layout) -> torch.Tensor:
    """Attention probabilities [..., S] over raster keys summed per KV block of BSA's ``layout``: [..., n_kv_blocks]."""
    block = layout.token_slot // layout.block_size
    return probs.new_zeros(*probs.shape[:-1], layout.num_kv_blocks).index_add_(-1, block, probs)


def _kv_block_mass_sums(probs, head, layout) -> tuple[float, float]:
    """Sums over kept queries of the full-attention mass on the KV blocks their query block selected, and on
    the same number of KV blocks with the most mass (the best any KV rule could do with that budget)."""
    rows = probs.gather(2, head.kept_token[..., None].expand(-1, -1, -1, probs.shape[-1]))  # [B, 1, Nq, S]
    mass = mass_per_kv_block(rows, layout) * head.kept_valid[..., None]
    per_block = rearrange(mass, "b h (n r) j -> b h n r j", r=layout.block_size).sum(3)  # [B, 1, nq, nkv]
    chosen = head.kv_blocks
    best = F.pad(per_block.sort(-1, descending=True).values.cumsum(-1), (1, 0))  # best[..., m]: top m blocks
    return float((per_block * chosen).sum()), float(best.gather(-1, chosen.sum(-1, keepdim=True)).sum())


@torch.no_grad()
def attention_mass(q, k, selection, layout, scale: float) -> dict[str, float]:
    """Full attention's mass that BSA's selection kept, one softmax per head: q, k [B, H, S, D] raster.

    retained_mass: mean over tokens, on the keys each token's output was computed from (after the fill);
    kv_mass_selected / kv_mass_oracle: mean over kept queries, on their query block's KV blocks, and on
    as many KV blocks chosen with hindsight (the most massive)."""
    retained = selected = oracle = 0.0
    for h in range(q.shape[1]):
        probs = torch.softmax(q[:, h:h + 1].float() @ k[:, h:h + 1].float().transpose(-1, -2) * scale, -1)
        head = type(selection)(*(x[:, h:h + 1] for x in selection))
        retained += _retained_mass_sum(probs, head, layout)
        head_selected, head_oracle = _kv_block_mass_sums(probs, head, layout)
        selected, oracle = selected + head_selected, oracle + head_oracle
        del probs
    tokens, kept = q.shape[0] * q.shape[1] * q.shape[2], float(selection.kept_valid.sum())
    return {"retained_mass": retained / tokens, "kv_mass_selected": selected / kept, "kv_mass_oracle": oracle / kept}


@torch.no_grad()
def top_kv_block_mass(q, k, layout, fraction: float, scale: float) -> float:
    """Mean over tokens of full attention's mass on the ``fraction`` of KV blocks (at least one) with the most
    mass for the token's query block: how block-sparse attention is, whatever the KV rule. q, k [B, H, S, D]
    raster, video tokens only; blocks are BSA's (``layout``: tile-major slots cut into KV blocks)."""
    block = layout.token_slot // layout.block_size  # [S] each token's query and KV block
    top = max(1, math.ceil(fraction * layout.num_kv_blocks))
    total = 0.0
    for h in range(q.shape[1]):
        probs = torch.softmax(q[:, h].float() @ k[:, h].float().transpose(-1, -2) * scale, -1)  # [B, S, S]
        by_kv = mass_per_kv_block(probs, layout)  # [B, S, n_kv_blocks]
        by_blocks = by_kv.new_zeros(by_kv.shape[0], layout.num_kv_blocks, by_kv.shape[2]).index_add_(1, block, by_kv)
        total += float(by_blocks.topk(top, -1).values.sum())
        del probs, by_kv
    return total / (q.shape[0] * q.shape[1] * q.shape[2])


@torch.no_grad()
def concentration(model: VideoDiT, clips: torch.Tensor, block_size: int, dtype, fraction: float = 0.1,
                  times=(0.2, 0.5, 0.9)) -> list[dict]:
    """Per layer and flow time: the attention mass on the best ``fraction`` of KV blocks (``top_kv_block_mass``)
    of the dense model on noised ``clips``; near 1 where a sparse KV side can keep what matters."""
    config = BSAConfig(block_size=block_size)
    rows = []
    for t in times:
        for layer, (q, k, _, video_shape) in enumerate(captured_qkv(model, clips, t, dtype)):
            layout = tile_layout(video_shape, config.tile, config.window, block_size, q.device)
            rows.append({"layer": layer, "flow_time": t, "fraction": fraction,
                         "top_kv_block_mass": top_kv_block_mass(q, k, layout, fraction, q.shape[-1] ** -0.5)})
    return rows


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
                             **attention_mass(q, k, stats.selection, stats.layout, q.shape[-1] ** -0.5)})
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
    """A grid: one row per source (data, each arm), ``frames`` frames of the first clip, channels 0-2 as RGB.

    Every row is drawn on the first row's scale (per channel, its range; values beyond it clipped), so that
    a sample's contrast reads against the data's, and a few outlying values cannot grey out a whole row.
    """
    plt = pyplot_or_none()
    if plt is None:
        return "matplotlib is not installed: no sample grid written"
    reference = next(iter(rows.values()))[0, :3].float().cpu()
    low = reference.amin((1, 2, 3), keepdim=True)
    span = (reference.amax((1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
    frames = min(frames, reference.shape[1])
    fig, axes = plt.subplots(len(rows), frames, figsize=(1.6 * frames, 1.7 * len(rows)), squeeze=False)
    for r, (name, clip) in enumerate(rows.items()):
        video = ((clip[0, :3].float().cpu() - low) / span).clamp(0.0, 1.0)
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
