"""The ``bsa-flex`` command: ``demo``, ``bench`` and ``viz`` subcommands."""
from __future__ import annotations

import argparse
import sys
import time

DESCRIPTION = """Bidirectional Sparse Attention (BSA) for video diffusion transformers, on FlexAttention.

  bsa-flex demo                 run BSA on a synthetic video clip and compare it with full attention
  bsa-flex bench --quick        time SDPA, dense FlexAttention and BSA (GPU; --quick is a CPU smoke test)
  bsa-flex viz --out pictures   draw the kept queries, the KV blocks and the sparsity per layer

'bsa-flex SUBCOMMAND --help' explains each one."""


def _video(text: str) -> tuple[int, int, int]:
    from .validation import check_triple
    try:
        return check_triple("the video", tuple(int(p) for p in text.lower().replace(",", "x").split("x")))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected three positive sizes T x H x W such as 8x32x32, "
                                         f"got {text!r}") from None


def _fraction(text: str) -> float:
    from .validation import check_real
    try:
        value = float(text)
        check_real("the value", value, 0.0, 1.0, low_open=True)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    return value


def _add_sparsity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", type=_video, default=(8, 32, 32), metavar="TxHxW",
                        help="video tokens per axis after patching (default 8x32x32 = 8,192 tokens)")
    parser.add_argument("--keep", type=_fraction, default=1.0,
                        help="query keep ratio per window (default 1.0, as BSAConfig(); the paper's is 0.5)")
    parser.add_argument("--threshold", type=_fraction, default=0.9,
                        help="KV threshold: attention mass the kept KV blocks must reach (default 0.9)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")


def demo(args) -> None:
    """BSA on video-like q/k/v: sparsity, time and error against full attention (SDPA)."""
    import torch
    import torch.nn.functional as F

    import bsa_flex
    from bsa_flex.synthetic import video_qkv

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = video_qkv(1, args.heads, args.heads, args.video, args.head_dim, dtype=dtype, device=device, seed=0,
                        sharpness=2.0, noise=0.1)
    config = bsa_flex.BSAConfig(query_keep_ratio=args.keep, kv_threshold=args.threshold)

    def timed(fn):
        best = float("inf")
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return out, best * 1e3

    start = time.perf_counter()
    bsa_flex.attention(q, k, v, args.video, config)  # the first call compiles
    compile_s = time.perf_counter() - start
    (out, stats), bsa_ms = timed(lambda: bsa_flex.attention(q, k, v, args.video, config, return_stats=True))
    full, full_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    error = float((out.float() - full.float()).norm() / full.float().norm())
    print(f"{q.shape[2]:,} tokens ({'x'.join(map(str, args.video))}), {args.heads} heads x {args.head_dim}, "
          f"{device}, path {stats.path} (first call compiled in {compile_s:.1f} s)")
    print(f"sparsity {float(stats.sparsity):.3f}: kept queries {float(stats.kept_query_fraction):.2f}, "
          f"KV block density {float(stats.kv_density.mean()):.3f}")
    print(f"best of 3: BSA {bsa_ms:.2f} ms, full attention (SDPA) {full_ms:.2f} ms"
          + ("" if device == "cuda" else " (CPU; BSA's speed-ups are on the GPU)"))
    print(f"relative L2 error against full attention: {error:.3f} (synthetic q/k/v; measure on your model's)")


def viz(args) -> None:
    """Write the kept-query map, the KV-block matrix and the sparsity per layer as PNGs."""
    import bsa_flex
    from bsa_flex.viz import render_figures

    config = bsa_flex.BSAConfig(query_keep_ratio=args.keep, kv_threshold=args.threshold)
    for path in render_figures(args.out, args.video, config, heads=args.heads, head_dim=args.head_dim,
                               layers=args.layers):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsa-flex", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    demo_parser = sub.add_parser("demo", help="BSA vs full attention on a synthetic clip",
                                 description=demo.__doc__)
    _add_sparsity_arguments(demo_parser)
    demo_parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    sub.add_parser("bench", help="the benchmark (python -m bsa_flex.bench); see 'bsa-flex bench --help'",
                   add_help=False)
    viz_parser = sub.add_parser("viz", help="PNGs of what BSA selected", description=viz.__doc__)
    _add_sparsity_arguments(viz_parser)
    viz_parser.add_argument("--layers", type=int, default=6, help="layers in the sparsity-per-layer chart")
    viz_parser.add_argument("--out", default="bsa_flex_figures", help="output folder (default bsa_flex_figures)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark keeps its own options and help
        from bsa_flex import bench
        return bench.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    for name in ("heads", "head_dim", "layers"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    try:
        {"demo": demo, "viz": viz}[args.command](args)
    except (ValueError, TypeError, ImportError) as error:  # a user's bad combination: one line, no traceback
        print(f"bsa-flex {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
