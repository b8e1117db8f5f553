"""An ESTIMATE (no GPU involved) of the memory one 1024-px Perfusion training step on SD XL needs, made at full size on
the meta device: parameter bytes by component, plus the activations the backward pass keeps, counted as the bytes of
every tensor autograd saves during one UNet forward (batch 1, 128x128 latents, a 77x2048 context that needs grads,
as the learned embeddings' gradient flows back through it).

    python scripts/sdxl_memory_estimate.py [--batch 1] [--json out.json]

Counts are exact for the tensors they count; what they leave out is why the result is an estimate: the CUDA
allocator's caching and fragmentation, cuDNN/attention workspaces, the text encoders' and the VAE encoder's
transient activations (the VAE encodes each crop once, without grads), and the optimizer state (AdamW over
83,200 + 2,048 floats: negligible). Activations are counted in float32 on the meta device; under 16-mixed most are
float16, so the script also reports half of that. With gradient checkpointing (configs/perfusion_teddy_sdxl.yaml)
only each checkpointed block's inputs stay, plus one block's activations while it is recomputed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

GIB = 1024 ** 3


def estimate(config_path: str = "configs/perfusion_teddy_sdxl.yaml", batch: int = 1) -> dict:
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(config_path)
    config.model.params.ckpt_path = None
    config.model.params.C_inv_path = None
    config.model.params.unet_config.params.use_checkpoint = False  # blocks are counted one by one below
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    unet = model.model.diffusion_model
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in
              (("unet", unet), ("vae", model.first_stage_model), ("text_encoders", model.conditioner))}
    trainable = sum(layer.target_output.numel() for layer in model.value_layers.values()) + \
        sum(p.numel() for p in model.embedding_manager.parameters())

    # bytes autograd saves, attributed to the checkpointable blocks (ResBlock, BasicTransformerBlock) or outside
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    current, saved, block_inputs = [None], {}, []

    def pre(module, args):
        current[0] = module
        block_inputs.append(sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))

    def post(module, args, output):
        current[0] = None

    def pack(tensor):
        key = id(current[0])
        saved[key] = saved.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    side = int(config.model.params.image_size)
    x = torch.randn(batch, 4, side, side, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    context = torch.randn(batch, 77, 2048, device="meta", requires_grad=True)
    vector = torch.randn(batch, model.conditioner.vector_dim, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(x, t, context=context, y=vector)
    for handle in handles:
        handle.remove()
    outside = saved.pop(id(None), 0)
    per_block = list(saved.values())
    full = outside + sum(per_block)
    checkpointed = outside + sum(block_inputs) + max(per_block)
    weights = 4 * sum(params.values())  # 16-mixed keeps the frozen weights in float32
    result = {
        "estimate": True, "batch": batch, "latent_side": side,
        "parameters": params, "trainable_floats": trainable,
        "weights_fp32_GiB": weights / GIB,
        "activations_fp32_GiB": {"no_checkpointing": full / GIB, "gradient_checkpointing": checkpointed / GIB},
        "activations_16mixed_GiB": {"no_checkpointing": full / 2 / GIB, "gradient_checkpointing": checkpointed / 2 / GIB},
    }
    result["step_16mixed_checkpointing_GiB"] = (weights + checkpointed / 2) / GIB
    result["step_16mixed_no_checkpointing_GiB"] = (weights + full / 2) / GIB
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/perfusion_teddy_sdxl.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = estimate(args.config, args.batch)
    text = json.dumps(result, indent=2)
    print("ESTIMATE (meta device, no GPU):\n" + text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
