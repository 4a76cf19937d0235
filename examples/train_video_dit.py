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

import bsa_flex
from bsa_flex import BSAConfig, SparsitySchedule, layer_stats
from bsa_flex.extras import environment, progress
from masks import FILL_POLICIES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # video_dit beside this script, however run
from video_dit import (VideoDiT, autocast_dtype, draw_plots, make_clips, sample, step_noise, train_step,  # noqa: E402
                       training_free_sweep, validation_loss)


# ----------------------------------------------------------------------------- one arm

def train_arm(name: str, args, bsa: BSAConfig | None, schedule: SparsitySchedule | None, val_clips, device) -> dict:
    """Train one arm; return its curves, timings, sparsity record and the model."""
    torch.manual_seed(args.seed)  # the same initial weights in both arms
    model = VideoDiT(args.channels, args.patch, args.width, args.layers, args.heads, bsa).to(device)
    runner = torch.compile(model, dynamic=False) if args.compile else model
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    dtype = autocast_dtype(device)
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
        loss = train_step(model, optimiser, clean, noise, t, dtype, runner)
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["step_ms"].append((time.perf_counter() - start) * 1e3)
        record["train_loss"].append(float(loss))
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
    kv_budget: float | None  # the BSA arm's KV block budget per query block (BSAConfig.kv_budget: a share, rounded up)


PRESETS = {
    # 16 x 64 x 64 latents, 1x2x2 patches: 16 x 32 x 32 = 16,384 tokens per clip. BSA: every query kept,
    # 12 of 128 KV blocks at most (sparsity 0.905): the setting that matched full attention on H200s
    # (benchmarks/results/train_video_dit_h200); dropping queries (keep 0.75 or 0.5) did not.
    "gpu": Preset(latent=(16, 64, 64), patch=(1, 2, 2), channels=4, width=384, layers=6, heads=6, batch=2,
                  steps=1000, block_size=128, lr=3e-4, final_keep=1.0, kv_budget=12 / 128),
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
                        help="BSA arm: KV block budget per query block (default: 12/128 of the KV blocks, rounded "
                             "up, on the GPU preset: 12 at its shape; none on --tiny)")
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
    dtype = autocast_dtype(device)
    val_clips = make_clips([900_000 + i for i in range(4)], *args.latent, args.channels, device)
    bsa = schedule = None
    if name == "bsa":
        bsa = BSAConfig(query_keep_ratio=args.final_keep, kv_threshold=args.final_threshold,
                        block_size=args.block_size, max_kv_blocks=args.max_kv_blocks, fill=args.fill,
                        kv_budget=args.kv_budget if args.max_kv_blocks is None else None)
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
