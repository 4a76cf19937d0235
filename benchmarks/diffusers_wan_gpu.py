"""A small random WanTransformer3DModel at a Wan-like token count on one GPU: dense vs BSA.

    PYTHONPATH=$PWD python benchmarks/diffusers_wan_gpu.py      (needs diffusers; OUT=dir for the JSON)

2 blocks of Wan2.1-1.3B's attention shape (12 heads x 128), latents 16 x 56 x 104 -> 16 x 28 x 52 =
23,296 tokens after 1x2x2 patches, bf16. Times forward and forward+backward of the whole model
(do_bench medians), the output difference BSA vs dense, and BSA's sparsity per layer.
"""
import json
import os

import torch
from triton.testing import do_bench

import diffusers
from bsa_flex import BSAConfig
from bsa_flex.integrations.diffusers import apply_bsa, remove_bsa


def main():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=256, freq_dim=256, ffn_dim=1536, num_layers=2).to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, 56, 104, generator=g, device="cuda", dtype=torch.bfloat16),
                  timestep=torch.tensor([500], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 512, 256, generator=g, device="cuda", dtype=torch.bfloat16),
                  return_dict=False)
    compiled = torch.compile(model, dynamic=False)

    def measure(name):
        forward = lambda: compiled(**inputs)[0]  # noqa: E731
        step = lambda: forward().float().square().mean().backward()  # noqa: E731
        step()  # compile forward and backward
        with torch.no_grad():
            out = forward()
        return out, {"arm": name, "fwd_ms": do_bench(lambda: forward().sum(), return_mode="median"),
                     "fwd_bwd_ms": do_bench(step, return_mode="median")}

    dense_out, dense = measure("dense")
    handle = apply_bsa(model, BSAConfig(query_keep_ratio=0.5, kv_threshold=0.9))
    torch._dynamo.reset()
    bsa_out, bsa = measure("bsa")
    bsa["sparsity_per_layer"] = [row["sparsity"] for row in handle.stats()]
    bsa["rel_l2_vs_dense"] = float((bsa_out.float() - dense_out.float()).norm() / dense_out.float().norm())
    remove_bsa(model)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "tokens": 16 * 28 * 52, "rows": [dense, bsa]}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "diffusers_wan_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
