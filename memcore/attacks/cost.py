"""Attack-cost model: UNet FLOPs per candidate and the projected cost of a full run (``--dry-run``), and the
short calibration behind ``memcore profile``.

What is counted. FLOPs (2 per multiply-add) are counted with ``torch.utils.flop_counter.FlopCounterMode`` on
one UNet forward of one image (batch 1: every counted op is linear in the batch, so a micro-batch of B images
costs B times as much), including attention (PyTorch's CPU attention kernel has no formula in the counter; it is
given one here, so the count does not depend on the device it is taken on). Matmuls, convolutions and
attention are counted; elementwise work (norms, activations, the sampler step) is not, as is usual for MFU. A
sampled image costs ``num_inference_steps`` forwards, times 2 with classifier-free guidance (the UNet runs an
unconditional and a conditional row; diffusers' rule: only when guidance_scale > 1), plus one VAE decode for
latent models. The engine runs every micro-batch at its full size (the last one is padded), so the images
sampled, not the candidates, are what is paid for. A text model's encoder runs once per prompt (the engine's
embedding cache), plus once for the empty prompt of guidance. Not counted: the tiled-L2 graph, the clique
search (host), the verification and the NN extraction's k-NN: at the SPEC's settings their FLOPs are well
under 1 % of the UNet's (CIFAR-10: a candidate's k-NN against 50,000 training images is ~5e8 FLOPs, its 50 UNet
forwards ~6e11), and ``memcore profile`` measures their share of the wall time.

GPU-hours use a measured throughput (images sampled per second, from ``memcore profile``) when one is given,
otherwise the FLOPs at an *assumed* utilisation (default 50 %) of the peak of an H100 SXM in the model's dtype
(dense: bfloat16/float16 989.4 TFLOP/s; float32 convolutions 494.7 with TF32, cuDNN's default, and float32
matmuls 66.9, PyTorch's default "highest" precision, unless ``torch.set_float32_matmul_precision`` allows TF32),
and say which.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

#: H100 SXM dense tensor-core peaks (TFLOP/s, NVIDIA's datasheet; the sparse figures are twice these).
H100_BF16_TFLOPS = 989.4
H100_TF32_TFLOPS = 494.7
#: H100 SXM float32 without tensor cores (TFLOP/s).
H100_FP32_TFLOPS = 66.9


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    """Attention kernels the flop counter has no formula for: on CPU ``scaled_dot_product_attention`` runs
    ``_scaled_dot_product_flash_attention_for_cpu``, which the counter would count as 0 FLOPs (an SD UNet's
    self-attention is a large share of its FLOPs), while the CUDA kernels are counted."""
    from torch.utils.flop_counter import flop_registry

    out = {}
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            out[op] = _sdpa_formula
    return out


def _counted(fn) -> tuple[int, int, Any]:
    """(FLOPs, of which convolutions, return value) of ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as fc:
        ret = fn()
    counts = fc.get_flop_counts().get("Global", {})
    conv = sum(v for k, v in counts.items() if "convolution" in str(k))
    return int(sum(counts.values())), int(conv), ret


def unet_flops(model: Any) -> dict[str, Any]:
    """FLOPs of one UNet forward of one image, of one decode and of one prompt encoding, for a loaded model.

    Args:
        model: a ``memcore.models.loading.LoadedModel`` or a ``memcore.attacks.reference.ReferenceModel``
            (anything with ``kind`` and ``unet``, and ``vae``/``text_encoder``/``tokenizer`` or a diffusers
            ``pipeline`` holding them for a text model).

    Returns:
        {"unet_forward": F, "unet_forward_conv": F's convolution FLOPs, "decode": D (0 for pixel models),
        "decode_conv": D's convolution FLOPs, "text_encoder": T (one prompt; 0 without a text encoder),
        "dtype": the UNet's dtype name}. FLOPs are counts (2 per multiply-add), not rates.
    """
    unet = model.unet
    p = next(unet.parameters())
    # a ReferenceModel keeps a text model's parts in its diffusers pipeline (carlini._components' rule)
    parts = getattr(model, "pipeline", None) or model

    shape = getattr(model, "sample_shape", None)
    if shape is None:
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        shape = (cfg.in_channels, *size)
    x = torch.zeros((1, *shape), dtype=p.dtype, device=p.device)
    t = torch.tensor([10], device=p.device)
    kind = model.kind
    kwargs: dict[str, Any] = {}
    text = 0
    if kind == "class_unet":
        kwargs["class_labels"] = torch.zeros(1, dtype=torch.long, device=p.device)
    elif kind == "sd_pipeline":
        # the context the engine (and diffusers' encode_prompt) gives the UNet: the encoder's output for a
        # prompt padded to the tokenizer's model_max_length (77 for SD; the cross-attention cost scales with it)
        te, tok = parts.text_encoder, parts.tokenizer
        ids = tok(
            "", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(next(te.parameters()).device)
        text, _, emb = _counted(lambda: te(ids)[0])
        kwargs["encoder_hidden_states"] = emb.to(dtype=p.dtype, device=p.device)
    fwd, fwd_conv, _ = _counted(lambda: unet(x, t, **kwargs))
    dec = dec_conv = 0
    vae = getattr(parts, "vae", None)
    if vae is not None:
        dec, dec_conv, _ = _counted(lambda: vae.decode(x.to(next(vae.parameters()).dtype)))
    return {
        "unet_forward": fwd,
        "unet_forward_conv": fwd_conv,
        "decode": dec,
        "decode_conv": dec_conv,
        "text_encoder": text,
        "dtype": str(p.dtype).removeprefix("torch."),
    }


def assumed_peak(flops: dict[str, Any], per_image: float, conv_per_image: float) -> tuple[float, str]:
    """The H100 SXM peak (TFLOP/s) the FLOPs of a sampled image run at in the model's dtype, and its wording.

    bfloat16/float16 convolutions and matmuls run on tensor cores. float32 convolutions do too, in TF32, when
    cuDNN may use it (``torch.backends.cudnn.allow_tf32``, on by default); float32 matmuls and attention only
    when ``torch.set_float32_matmul_precision`` is not "highest" (the default), else on the float32 units.
    Mixed, the effective peak is the one at which the image's FLOPs take as long as at their two peaks.
    """
    dtype = flops.get("dtype", "bfloat16")
    if dtype in ("bfloat16", "float16"):
        return H100_BF16_TFLOPS, f"H100 SXM dense {dtype}"
    if dtype != "float32":
        return H100_BF16_TFLOPS, f"H100 SXM dense bfloat16 (no figure for {dtype})"
    conv_peak = H100_TF32_TFLOPS if torch.backends.cudnn.allow_tf32 else H100_FP32_TFLOPS
    mm_peak = H100_TF32_TFLOPS if torch.get_float32_matmul_precision() != "highest" else H100_FP32_TFLOPS
    if conv_peak == mm_peak or per_image <= 0:
        return conv_peak, f"H100 SXM float32 ({'TF32' if conv_peak == H100_TF32_TFLOPS else 'no TF32'})"
    conv = min(conv_per_image, per_image)
    peak = per_image / (conv / conv_peak + (per_image - conv) / mm_peak)
    return peak, (
        f"H100 SXM float32: {conv / per_image:.0%} convolutions at {conv_peak:g}, the rest at {mm_peak:g}"
    )


@dataclasses.dataclass(frozen=True)
class CostProjection:
    """Projected cost of an extraction run (FLOPs are counts, ``peak_tflops`` a rate, ``gpu_hours`` hours).

    Attributes:
        conditions: conditions of the run.
        candidates: conditions x per condition, plus the NN extraction's extra candidates.
        extra_candidates: the NN extraction's candidates beyond conditions x per condition.
        images_sampled: what the UNet runs: candidates rounded up to whole micro-batches (the last one is
            padded); ``candidates`` when ``micro_batch`` is None (not known: padding not counted).
        micro_batch: the micro-batch the run samples at, or None.
        steps: sampler steps.
        cfg: whether classifier-free guidance doubles the UNet rows.
        unet_flops_per_forward: one forward of one image.
        decode_flops_per_image: one VAE decode of one image (0 for pixel models).
        text_encoder_flops_per_prompt: one prompt encoding (0 without a text encoder).
        prompts_encoded: prompt encodings of the run (each condition once, plus "" with guidance).
        total_flops: everything counted (see the module docstring for what is not).
        peak_tflops / utilisation: the assumed device rate, None when a measured throughput was used.
        gpu_hours: projected device time.
        basis: how gpu_hours was obtained.
    """

    conditions: int
    candidates: int
    extra_candidates: int
    images_sampled: int
    micro_batch: int | None
    steps: int
    cfg: bool
    unet_flops_per_forward: int
    decode_flops_per_image: int
    text_encoder_flops_per_prompt: int
    prompts_encoded: int
    total_flops: float
    peak_tflops: float | None
    utilisation: float | None
    gpu_hours: float
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        if self.micro_batch is None:
            sampled = f"{self.images_sampled:,} (micro-batch not given: padding not counted)"
        else:
            pad = self.images_sampled - self.candidates
            sampled = f"{self.images_sampled:,} (micro-batch {self.micro_batch}; {pad:,} padding rows)"
        out = [
            f"conditions            {self.conditions:,}",
            f"candidates            {self.candidates:,}"
            + (
                f" ({self.extra_candidates:,} of them the NN extraction's alone)"
                if self.extra_candidates
                else ""
            ),
            f"images sampled        {sampled}",
            f"UNet FLOPs / forward  {self.unet_flops_per_forward:.3e} (one image, batch 1; linear in the batch)",
            f"forwards / image      {self.steps * (2 if self.cfg else 1)} ({self.steps} steps"
            + (", x2 classifier-free guidance: uncond + cond rows)" if self.cfg else ")"),
            f"decode FLOPs / image  {self.decode_flops_per_image:.3e}",
        ]
        if self.text_encoder_flops_per_prompt:
            out.append(
                f"text encoder FLOPs    {self.text_encoder_flops_per_prompt:.3e} / prompt x "
                f"{self.prompts_encoded:,} prompts"
            )
        out += [
            f"total FLOPs           {self.total_flops:.3e} (UNet, decode, text encoder; not counted: "
            "distances, cliques, k-NN)",
            f"projected GPU-hours   {self.gpu_hours:.4g} ({self.basis})",
        ]
        return out


def project(
    flops: dict[str, Any],
    *,
    conditions: int,
    per_condition: int,
    steps: int,
    cfg: bool,
    throughput: float | None = None,
    peak_tflops: float | None = None,
    utilisation: float = 0.5,
    extra_candidates: int = 0,
    micro_batch: int | None = None,
    device: str | None = None,
) -> CostProjection:
    """Turn FLOPs into a projection of the whole run.

    Args:
        flops: what :func:`unet_flops` returned.
        conditions / per_condition / steps / cfg: the run.
        throughput: measured images sampled per second (rows of the micro-batch, padding included, as
            ``memcore profile`` reports it) at the run's steps, guidance, micro-batch, dtype and device; wins over
            the assumed peak.
        peak_tflops: the device peak in TFLOP/s for every FLOP; None: an H100 SXM's in the model's dtype
            (:func:`assumed_peak`).
        utilisation: the assumed share of the peak reached, in (0, 1].
        extra_candidates: the NN extraction's candidates beyond ``conditions x per_condition``.
        micro_batch: the run's micro-batch (the last one is padded); None: padding not counted.
        device: where ``throughput`` was measured (for the wording).
    """
    cands = conditions * per_condition + extra_candidates
    if micro_batch is not None:
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        sampled = -(-cands // micro_batch) * micro_batch
    else:
        sampled = cands
    mult = steps * (2 if cfg else 1)
    per_image = mult * flops["unet_forward"] + flops["decode"]
    conv_per_image = mult * flops.get("unet_forward_conv", 0) + flops.get("decode_conv", 0)
    text = int(flops.get("text_encoder", 0))
    prompts = conditions + (1 if cfg else 0) if text else 0
    total = float(per_image) * sampled + float(text) * prompts
    peak = util = None
    if throughput is not None:
        if not math.isfinite(throughput) or throughput <= 0:
            raise ValueError(f"throughput must be a finite number > 0 (images/s), got {throughput}")
        hours = sampled / throughput / 3600
        basis = f"at the measured {throughput:.4g} images/s" + (f" on {device}" if device else "")
    else:
        if not 0 < utilisation <= 1:
            raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
        if peak_tflops is None:
            peak, what = assumed_peak(flops, per_image, conv_per_image)
        elif not math.isfinite(peak_tflops) or peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be a finite number > 0, got {peak_tflops}")
        else:
            peak, what = float(peak_tflops), "the given peak"
        util = float(utilisation)
        hours = total / (peak * 1e12 * util) / 3600
        basis = f"assumed {util:.0%} of {peak:.4g} TFLOP/s, {what}; run `memcore profile` to measure"
    return CostProjection(
        conditions=conditions,
        candidates=cands,
        extra_candidates=extra_candidates,
        images_sampled=sampled,
        micro_batch=micro_batch,
        steps=steps,
        cfg=cfg,
        unet_flops_per_forward=int(flops["unet_forward"]),
        decode_flops_per_image=int(flops["decode"]),
        text_encoder_flops_per_prompt=text,
        prompts_encoded=prompts,
        total_flops=total,
        peak_tflops=peak,
        utilisation=util,
        gpu_hours=hours,
        basis=basis,
    )
