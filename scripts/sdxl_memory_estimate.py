"""An ESTIMATE (no GPU involved) of the memory one 1024-px Perfusion training step on SD XL needs, made at full size on
the meta device: parameter bytes by component, plus the activations the backward pass keeps, counted as the bytes of
every tensor autograd saves during one UNet forward (batch 1, 128x128 latents, a 77x2048 context that needs grads,
as the learned embeddings' gradient flows back through it).

    python scripts/sdxl_memory_estimate.py [--batch 1] [--json out.json]
    python scripts/sdxl_memory_estimate.py --measure cuda   # also MEASURE the UNet part on a GPU, side by side

--measure DEVICE runs the same UNet forward + backward for real (random weights, 16-bit autocast as under 16-mixed,
frozen float32 weights, one random concept installed so that every edited layer runs its gated path, o*_V and the
context requiring grads), with and without gradient checkpointing, and reports
torch.cuda.max_memory_allocated next to the estimate; the VAE's and text encoders' float32 weights are added by
count, as in the estimate.

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

from ldm.util import BadValueError, run_command  # noqa: E402

GIB = 1024 ** 3


def install_one_concept(model, width: int, device) -> None:
    """Switch the edit on as in training: one concept's i*, C^-1 i* (random; the values do not change the memory) and
    the locked keys' o*_K = W_K i_super, so every edited layer runs its gated path and o*_V gets a gradient."""
    generator = torch.Generator("cpu").manual_seed(1)
    target, c_inv_target, superclass = (torch.randn(width, generator=generator).to(device) for _ in range(3))
    model.edit_state.set_targets(target[None], c_inv_target[None])
    model.edit_state.set_gating(model.train_beta, model.train_tau)
    for layer in model.key_layers.values():
        layer.initialize_targets(superclass)


def build_on_meta(config_path: str, checkpointing: bool):
    """(config, the Perfusion model built from it on the meta device: no weights loaded, no C^-1)."""
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(config_path)
    config.model.params.ckpt_path = None
    config.model.params.C_inv_path = None
    config.model.params.unet_config.params.use_checkpoint = checkpointing
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    return config, model


def estimate(config_path: str = "configs/perfusion_teddy_sdxl.yaml", batch: int = 1) -> dict:
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    config, model = build_on_meta(config_path, checkpointing=False)  # blocks are counted one by one below
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
    unet_params = config.model.params.unet_config.params
    x = torch.randn(batch, int(unet_params.in_channels), side, side, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    context = torch.randn(batch, 77, int(unet_params.context_dim), device="meta", requires_grad=True)
    # the edit stays off here (autocast, which the edited layers use, does not exist on the meta device); its gated
    # term adds a (77 x 1) gate and one row product per edited layer, negligible beside the rest; --measure runs it
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


def measure(config_path: str, batch: int, device: str, checkpointing: bool, repeats: int = 3) -> dict:
    """Peak CUDA memory and time of one UNet forward + backward of the SDXL Perfusion model (random weights)."""
    import time

    config, model = build_on_meta(config_path, checkpointing)
    unet = model.model.diffusion_model
    device = torch.device(device)
    unet.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():  # the values do not change the memory; small ones keep activations finite
        for tensor in [*unet.parameters(), *unet.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
    # only o*_V requires grads, as in training: Perfusion froze the UNet, and to_empty keeps requires_grad
    trainable = [layer.target_output for layer in model.value_layers.values()]
    unet_params = config.model.params.unet_config.params
    side = int(config.model.params.image_size)
    x = torch.randn(batch, int(unet_params.in_channels), side, side, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    vector = torch.randn(batch, model.conditioner.vector_dim, device=device)
    width = int(unet_params.context_dim)
    install_one_concept(model, width, device)
    cuda = device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    weights = torch.cuda.memory_allocated(device) if cuda else None
    times, grad_norm = [], 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        context = torch.randn(batch, 77, width, device=device, requires_grad=True)
        synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16 if cuda else torch.bfloat16):
            out = unet(x, t, context=context, y=vector)
        out.float().pow(2).mean().backward()
        synchronize()
        times.append(time.perf_counter() - start)
        grad_norm = float(sum(p.grad.float().norm() ** 2 for p in trainable if p.grad is not None) ** 0.5)
        for p in trainable:
            p.grad = None
    result = {"seconds_per_step": sorted(times)[len(times) // 2], "first_step_seconds": times[0],
              "o_star_V_grad_norm": grad_norm, "context_grad_norm": float(context.grad.float().norm())}
    if cuda:  # memory is measured on CUDA only
        peak = torch.cuda.max_memory_allocated(device)
        result.update(unet_weights_GiB=weights / GIB, peak_GiB=peak / GIB, step_extra_GiB=(peak - weights) / GIB)
    del unet, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/perfusion_teddy_sdxl.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure", default=None, metavar="DEVICE",
                        help="also measure the UNet forward + backward on this CUDA device (e.g. cuda)")
    return run_command(report, parser.parse_args(argv))


def report(args) -> int:
    result = estimate(args.config, args.batch)
    text = json.dumps(result, indent=2)
    print("ESTIMATE (meta device, no GPU):\n" + text)
    if args.measure:
        if not torch.cuda.is_available():
            raise BadValueError(f"--measure {args.measure} needs CUDA, and torch sees no CUDA device")
        others = 4 * (result["parameters"]["vae"] + result["parameters"]["text_encoders"]) / GIB
        measured = {}
        for checkpointing in (True, False):
            key = "gradient_checkpointing" if checkpointing else "no_checkpointing"
            try:
                measured[key] = measure(args.config, args.batch, args.measure, checkpointing)
                measured[key]["step_16mixed_GiB_with_other_weights"] = measured[key]["peak_GiB"] + others
                estimated = result["step_16mixed_checkpointing_GiB" if checkpointing else
                                   "step_16mixed_no_checkpointing_GiB"]
                measured[key]["measured_over_estimate"] = measured[key]["step_16mixed_GiB_with_other_weights"] / estimated
            except torch.cuda.OutOfMemoryError as error:
                measured[key] = {"out_of_memory": str(error).splitlines()[0]}
        result["measured"] = {"device": torch.cuda.get_device_name(torch.device(args.measure)),
                              "torch": torch.__version__, **measured}
        text = json.dumps(result, indent=2)
        print("MEASURED (" + result["measured"]["device"] + "):\n" + json.dumps(result["measured"], indent=2))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
