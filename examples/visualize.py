"""Draw what BSA selected on a synthetic clip: the pictures in the README.

    python examples/visualize.py --out docs/figures      (needs: pip install 'bsa-flex[viz]')

For your own model: ``out, stats = bsa_flex.attention(..., return_stats=True)``, then
``bsa_flex.viz.plot_kept_queries(stats, video_shape, "kept.png")`` and ``plot_kv_blocks(stats, "kv.png")``;
``plot_sparsity_per_layer(bsa_flex.layer_stats(model_layers), "layers.png")`` after a forward pass.
"""
import argparse

import bsa_flex
from bsa_flex.viz import render_figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures")
    args = parser.parse_args()
    config = bsa_flex.BSAConfig(query_keep_ratio=0.5, kv_threshold=0.9)
    for path in render_figures(args.out, (8, 32, 32), config, heads=4, head_dim=64, layers=8):
        print(path)


if __name__ == "__main__":
    main()
