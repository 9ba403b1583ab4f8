"""GPU diagnostic: where does memcore's eager diffusers-step path part from the stock DDIMPipeline on CUDA?

Prints: stock pipeline run twice (its own determinism), initial noise equality, and the first step at which
a hand loop written like the pipeline and memcore's Sampler differ. Run on a GPU machine only.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

from memcore.sampling import Sampler, SamplerConfig
from memcore.sampling.seeds import initial_noise


def main() -> None:
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    d = tempfile.mkdtemp()
    DDIMPipeline(unet, DDPMScheduler()).save_pretrained(d)
    seeds = [3, 1, 4, 1000]
    pipe = DDIMPipeline.from_pretrained(d, local_files_only=True).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def run_pipe():
        gens = [torch.Generator("cuda").manual_seed(s) for s in seeds]
        return pipe(batch_size=4, generator=gens, num_inference_steps=50, output_type="pt").images

    a, b = run_pipe(), run_pipe()
    print("stock pipeline deterministic:", torch.equal(a, b), float((a - b).abs().max()))
    gens = [torch.Generator("cuda").manual_seed(s) for s in seeds]
    from diffusers.utils.torch_utils import randn_tensor

    x_ref = randn_tensor((4, 3, 8, 8), generator=gens, device=torch.device("cuda"), dtype=torch.float32)
    x_mc = initial_noise(seeds, (3, 8, 8), device="cuda", dtype=torch.float32)
    print("initial noise equal:", torch.equal(x_ref, x_mc))
    s = Sampler(d, SamplerConfig(batch_size=4, step_backend="diffusers"), device="cuda")
    unit = s.run_batch(seeds)
    print("sampler vs stock max diff:", float((unit - a.float()).abs().max()))
    # hand loop like the pipeline, with the timestep on the GPU vs on the CPU
    sched = pipe.scheduler
    for where in ("cpu", "cuda"):
        sched.set_timesteps(50)
        x = x_ref.clone()
        for t in sched.timesteps:
            tt = t.to(where)
            x = sched.step(pipe.unet(x, tt).sample, t, x, eta=0.0).prev_sample
        img = (x / 2 + 0.5).clamp(0, 1)
        print(f"hand loop (t on {where}) vs stock:", float((img - a).abs().max()))
    # where do they part? weights, first UNet output, first step
    pu, su = pipe.unet, s.model.unet
    wdiff = max(
        float((a_ - b_).abs().max()) for a_, b_ in zip(pu.state_dict().values(), su.state_dict().values())
    )
    print("weights max diff:", wdiff, "devices:", next(pu.parameters()).device, next(su.parameters()).device)
    sched.set_timesteps(50)
    t0 = sched.timesteps[0]
    with torch.no_grad():
        o_ref = pu(x_ref, t0.to("cuda")).sample
        o_mc = s.unet_fn(x_ref, s.t_device[0], return_dict=False)[0]
    print("first UNet output diff:", float((o_ref - o_mc).abs().max()), "t:", int(t0), int(s.t_device[0]))
    fresh = s._fresh_scheduler()
    print("timesteps equal:", torch.equal(fresh.timesteps.cpu(), sched.timesteps.cpu()), type(fresh).__name__)
    seeds_dev = torch.tensor(seeds, device="cuda")
    with torch.no_grad():
        x1_mc = s._apply_step(fresh, x_ref, o_ref, 0, seeds_dev)
    x1_ref = sched.step(o_ref, t0, x_ref, eta=0.0).prev_sample
    print("first step diff:", float((x1_mc - x1_ref).abs().max()))
    with torch.no_grad():
        full = s._denoise_eager(x_ref.clone(), seeds_dev, {})
    print("eager loop vs stock:", float(((full / 2 + 0.5).clamp(0, 1) - a).abs().max()))
    print("decode(eager) vs stock:", float((s.decode(full).float() - a).abs().max()))
    cfg = s.config if hasattr(s, "config") else None
    print(
        "sampler config:",
        cfg,
        "kernel backend:",
        getattr(s, "kernel_backend", None),
        "step backend:",
        getattr(s, "step_backend", None),
        "graphs:",
        getattr(s, "use_graphs", None),
    )
    print(
        "unet dtype/memory format:",
        s.model.unet.dtype,
        next(s.model.unet.parameters()).is_contiguous(memory_format=torch.channels_last),
    )


if __name__ == "__main__":
    main()
