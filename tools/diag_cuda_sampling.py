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
