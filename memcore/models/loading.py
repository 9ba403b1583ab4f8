"""Load diffusers models and Stable-Diffusion-layout pipelines from local paths (never from the network).

Accepted inputs (``load_model``):

- a pipeline directory holding ``model_index.json`` (``UNet2DModel`` pipelines such as DDPM/DDIM, or the Stable
  Diffusion layout: ``unet/`` ``UNet2DConditionModel`` + ``text_encoder/`` CLIP text model + ``tokenizer/`` +
  ``vae/`` ``AutoencoderKL`` + ``scheduler/``); components are loaded one by one, so a safety checker or feature
  extractor in the directory is never loaded;
- a model directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``, or shards with
  their index): a ``UNet2DModel``, unconditional or class-conditional (``num_class_embeds``);
- a ``.safetensors`` file with a ``config.json`` next to it (a ``UNet2DModel`` state dict);
- a loaded diffusers object: ``UNet2DModel``, or a pipeline with ``unet`` + ``scheduler`` (+ ``vae``,
  ``text_encoder``, ``tokenizer`` for text-to-image).

In a directory (or a pipeline's component folder) the plain weights file is loaded, as diffusers does; a folder
holding one variant only (``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16.safetensors``) loads that
variant, which diffusers does only when given ``variant=``.

The scheduler comes from ``scheduler/scheduler_config.json`` of a pipeline, or ``scheduler_config.json`` next to
a model directory or file; a bare UNet with none gets ``DDPMScheduler()`` defaults (1000 steps, linear betas
1e-4..0.02, the DDPM paper's schedule) unless ``scheduler=`` is given. Every diffusers/transformers call passes
``local_files_only=True``: a string that looks like a hub id and is not a local path is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from memcore.utils.device import resolve_device

KINDS = ("unet", "class_unet", "sd_pipeline")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded model, ready for the sampling engine.

    Attributes:
        kind: ``"unet"`` (unconditional ``UNet2DModel``), ``"class_unet"`` (``UNet2DModel`` with class
            embeddings; conditions are class ids) or ``"sd_pipeline"`` (text-to-image, latent).
        unet: the denoiser (eval mode, no grad), on ``device`` in ``dtype``.
        scheduler: the scheduler as configured by the model (a template: the engine builds fresh copies).
        sample_shape: ``(C, H, W)`` of what the UNet denoises (latent shape for latent models).
        image_shape: ``(C, H, W)`` of the decoded images.
        latent: whether a VAE decodes the samples.
        vae: ``AutoencoderKL`` or None.
        vae_scale_factor: ``2 ** (len(vae.block_out_channels) - 1)`` (1 for pixel models).
        vae_scaling_factor: the VAE's latent ``scaling_factor`` (latents are divided by it before decode).
        text_encoder: CLIP text model or None.
        tokenizer: CLIP tokenizer or None.
        num_classes: number of class embeddings of a class-conditional UNet, else None.
        device: where the modules live.
        dtype: the UNet's parameter dtype.
        source: where it was loaded from (a path or the object's class name).
    """

    kind: str
    unet: torch.nn.Module
    scheduler: Any
    sample_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    latent: bool
    vae: torch.nn.Module | None = None
    vae_scale_factor: int = 1
    vae_scaling_factor: float | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    num_classes: int | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.latent and self.vae is None:
            raise ValueError("a latent model needs a VAE")
        if self.kind == "sd_pipeline" and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError("an sd_pipeline needs a text encoder and a tokenizer")
        if self.kind == "class_unet" and not self.num_classes:
            raise ValueError("a class_unet needs num_classes")

    @property
    def conditional(self) -> bool:
        return self.kind != "unet"


def _check_local(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        raise ValueError(
            f"{s!r} is not a local path; memcore never downloads models. Download it yourself (e.g. "
            "`huggingface-cli download ...`) and pass the local directory."
        )
    raise FileNotFoundError(f"model path {s!r} does not exist")


def _check_safetensors(path: Path) -> None:
    """Read a safetensors header so a corrupt or truncated file fails with a clear error before loading."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_slice(name)  # validates each entry's offsets against the file
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise ValueError(f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{path} is not a valid safetensors file (size {size} does not match its header)")


# the weights files diffusers (``diffusion_pytorch_model``) and transformers (``model``, ``pytorch_model``) load,
# whole or sharded (an index naming the shards); a variant puts its name before the suffix
# (``diffusion_pytorch_model.fp16.safetensors``, ``model.safetensors.index.fp16.json``)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
_TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")


def _weights_name(stems: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(
        rf"^(?:{'|'.join(stems)})(?:\.(?P<v1>[^.-]+))?\.(?:safetensors|bin)(?:\.index(?:\.(?P<v2>[^.-]+))?\.json)?$"
    )


def _check_weights_dir(d: Path, what: str, stems: tuple[str, ...] = _DIFFUSERS_WEIGHTS) -> str | None:
    """Check a component directory before diffusers/transformers read it; returns the variant to load.

    The variant is None when the plain weights file is there (what diffusers loads without ``variant=``), else
    the one variant present (``fp16`` for a folder holding only ``diffusion_pytorch_model.fp16.safetensors``),
    which diffusers loads only when told (its error then names the ``.bin`` it did not find either).
    """
    if not d.is_dir():
        raise FileNotFoundError(f"{what}: directory {d} is missing")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {d / 'config.json'} is missing")
    _read_json(d / "config.json")  # a list or broken JSON: diffusers took it for a hub id to download
    st = sorted(d.glob("*.safetensors"))
    if not st and not any(d.glob("*.bin")):
        raise FileNotFoundError(f"{what}: no weights file (*.safetensors or *.bin) in {d}")
    for f in st:
        _check_safetensors(f)
    found = [m for m in map(_weights_name(stems).match, sorted(os.listdir(d))) if m]
    if any(m["v1"] is None and m["v2"] is None for m in found):
        return None
    variants = sorted({m["v1"] or m["v2"] for m in found})
    if len(variants) == 1:
        return variants[0]
    names = sorted(f.name for f in d.iterdir() if f.suffix in (".safetensors", ".bin"))
    raise FileNotFoundError(
        f"{what}: no {stems[0]}.safetensors (or .bin, or a sharded index) in {d}"
        + (
            f", only the variants {', '.join(variants)}: memcore does not choose between them"
            if variants
            else f", only {', '.join(names)}"
            + (" (a lone .safetensors file loads when passed as the path itself)" if what == "model" else "")
        )
    )


# Every diffusers model load: local files only (never a download), and the plain loading path explicitly
# (diffusers otherwise warns on every load that `accelerate` is missing for low_cpu_mem_usage).
_DIFFUSERS_KW: dict[str, Any] = {"local_files_only": True, "low_cpu_mem_usage": False}
# transformers' loads (the text encoder): weights of other shapes are reported in the loading info
_TRANSFORMERS_KW: dict[str, Any] = {"local_files_only": True, "ignore_mismatched_sizes": True}


def _from_pretrained(
    cls: Any, root: Path, what: str, *, base: dict[str, Any] = _DIFFUSERS_KW, **kw: Any
) -> Any:
    """``cls.from_pretrained(root, **base, **kw)``, local files only, refusing weights that do not fit the config.

    diffusers raises a bare ``RuntimeError`` for a weight whose shape differs from the config's, and only logs
    a warning for weights the config expects but the file lacks (leaving them uninitialised) or the file has
    but the config does not use; transformers (``base=_TRANSFORMERS_KW``: shapes reported, not raised, as its
    error says only "see the report above") warns likewise and initialises them randomly. Each means
    ``config.json`` describes another model: a ``ValueError`` naming the files here (as for a ``.safetensors``
    file with a ``config.json`` beside it).
    """
    sub = kw.get("subfolder")
    d = root / sub if sub else root
    why = f"{what}: the weights in {d} do not match {d / 'config.json'}"
    if d.is_dir() and not any(d.glob("*.safetensors")):
        # pickled weights only: said up front, diffusers does not log a failed safetensors lookup first
        kw.setdefault("use_safetensors", False)
    try:
        model, info = cls.from_pretrained(str(root), **base, output_loading_info=True, **kw)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "Error(s) in loading state_dict" not in str(exc):
            raise
        raise ValueError(f"{why}: {_first_lines(str(exc))}") from None
    found = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        keys = sorted(info.get(key) or ())
        if keys:
            found.append(f"{len(keys)} {label} keys (e.g. {keys[:3]})")
    # (key, shape in the file, shape the config gives): transformers with ignore_mismatched_sizes
    shapes = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if shapes:
        eg = ", ".join(f"{k}: {list(a)} in the file, {list(b)} by the config" for k, a, b in shapes[:2])
        found.append(f"{len(shapes)} keys of other shapes (e.g. {eg})")
    if found:
        raise ValueError(f"{why}: " + ", ".join(found))
    return model


def _first_lines(msg: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    more = f" ... ({len(lines) - n} more lines)" if len(lines) > n else ""
    return " ".join(lines[:n]) + more


def _library_cls(library: str, name: Any, where: Path) -> Any:
    """The class ``name`` of ``library`` ("diffusers" or "transformers"), or a ValueError naming ``where``."""
    import importlib

    cls = getattr(importlib.import_module(library), name, None) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{where}: unknown {library} class {name!r}")
    return cls


def _component(index: dict[str, Any], name: str, root: Path) -> str | None:
    """The class name model_index.json gives a component (``"unet": ["diffusers", "UNet2DModel"]``); None when
    it has none (absent, or ``[null, null]`` as diffusers saves a safety checker left out)."""
    entry = index.get(name)
    if entry is None or (isinstance(entry, list) and len(entry) == 2 and entry[1] is None):
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ValueError(
            f"{root / 'model_index.json'}: {name!r} must be [library, class name], got {entry!r}"
        )
    return entry[1]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar on stderr (even when it is not a terminal) and logs
    a multi-line load report for weights that do not fit the config, which ``_from_pretrained`` turns into
    its one-line error: the CLI's output, errors included, is one line. Its own switches, restored after."""
    from transformers.utils import logging as tlog

    was, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if was:
            tlog.enable_progress_bar()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object of settings")
    return obj


def _load_scheduler_from(directory: Path) -> Any | None:
    cfg = directory / "scheduler_config.json"
    if not cfg.is_file():
        return None
    from diffusers import SchedulerMixin

    cls = _library_cls("diffusers", _read_json(cfg).get("_class_name", "DDPMScheduler"), cfg)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{cfg}: {cls.__name__} is not a diffusers scheduler")
    return cls.from_pretrained(str(directory), local_files_only=True)


def _default_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def _finish_unet(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    p = next(unet.parameters(), None)
    if dtype is not None and p is not None and p.dtype != dtype:
        unet = unet.to(device=device, dtype=dtype)
    else:  # already in dtype (loaded with torch_dtype): a second cast only makes diffusers warn
        unet = unet.to(device=device)
    # eval() only: the stock pipelines leave parameters with requires_grad=True, and that flag changes the
    # kernels some ops pick even under no_grad (torch.matmul's should_fold folds a batched product into one
    # GEMM whenever the weight-side operand requires grad, and may not otherwise). On the H100 a UNet with requires_grad_(False) gave outputs
    # 2e-6 away from the stock pipeline's after one step and 0.25 after 50 (tools/diag_cuda_sampling.py).
    unet.eval()
    return unet


def _describe_unet(
    unet: torch.nn.Module, scheduler: Any, device: torch.device, source: str, **extra: Any
) -> LoadedModel:
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg = unet.config
    size = cfg.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(cfg.in_channels), int(hw[0]), int(hw[1]))
    if isinstance(unet, UNet2DModel):
        num_classes = getattr(cfg, "num_class_embeds", None)
        if getattr(cfg, "class_embed_type", None) is not None and num_classes is None:
            raise ValueError(
                f"UNet2DModel with class_embed_type={cfg.class_embed_type!r} is not supported: memcore conditions "
                "UNet2DModel on integer class ids through num_class_embeds"
            )
        kind = "class_unet" if num_classes else "unet"
        out_shape = (int(cfg.out_channels), shape[1], shape[2])
        return LoadedModel(
            kind=kind,
            unet=unet,
            scheduler=scheduler,
            sample_shape=shape,
            image_shape=out_shape,
            latent=False,
            num_classes=int(num_classes) if num_classes else None,
            device=device,
            dtype=unet.dtype,
            source=source,
        )
    if isinstance(unet, UNet2DConditionModel):
        vae = extra.get("vae")
        te = extra.get("text_encoder")
        tok = extra.get("tokenizer")
        if vae is None or te is None or tok is None:
            raise ValueError(
                "a UNet2DConditionModel needs the Stable-Diffusion pipeline around it (vae, text_encoder, tokenizer): "
                "pass the pipeline directory"
            )
        vsf = 2 ** (len(vae.config.block_out_channels) - 1)
        return LoadedModel(
            kind="sd_pipeline",
            unet=unet,
            scheduler=scheduler,
            sample_shape=shape,
            image_shape=(int(vae.config.out_channels), shape[1] * vsf, shape[2] * vsf),
            latent=True,
            vae=vae,
            vae_scale_factor=vsf,
            vae_scaling_factor=float(vae.config.scaling_factor),
            text_encoder=te,
            tokenizer=tok,
            device=device,
            dtype=unet.dtype,
            source=source,
        )
    raise TypeError(
        f"unsupported denoiser {type(unet).__name__}; memcore samples UNet2DModel and UNet2DConditionModel"
    )


def _load_pipeline_dir(root: Path, device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    index_path = root / "model_index.json"
    index = _read_json(index_path)
    names = {c: _component(index, c, root) for c in ("unet", "scheduler", "vae", "text_encoder", "tokenizer")}
    if names["unet"] is None:
        raise ValueError(f"{index_path} names no 'unet' component; memcore samples UNet pipelines")
    unet_cls = _library_cls("diffusers", names["unet"], index_path)
    if names["unet"] == "UNet2DConditionModel":  # Stable Diffusion layout: say which part is missing
        for c in ("vae", "text_encoder", "tokenizer"):
            if names[c] is None:
                raise ValueError(
                    f"{index_path} names no {c!r} component: a UNet2DConditionModel pipeline (Stable Diffusion "
                    "layout) needs vae, text_encoder and tokenizer"
                )
    variant = _check_weights_dir(root / "unet", "unet")
    if names["scheduler"] is None:
        raise ValueError(f"{index_path} names no 'scheduler' component")
    unet = _from_pretrained(unet_cls, root, "unet", subfolder="unet", torch_dtype=dtype, variant=variant)
    unet = _finish_unet(unet, device, dtype)
    scheduler = _load_scheduler_from(root / "scheduler") if (root / "scheduler").is_dir() else None
    if scheduler is None:
        raise FileNotFoundError(f"{root}/scheduler/scheduler_config.json is missing")
    extra: dict[str, Any] = {}
    if names["vae"] is not None:
        vae_cls = _library_cls("diffusers", names["vae"], index_path)
        variant = _check_weights_dir(root / "vae", "vae")
        vae = _from_pretrained(vae_cls, root, "vae", subfolder="vae", torch_dtype=dtype, variant=variant)
        extra["vae"] = _finish_unet(vae, device, dtype)
    if names["text_encoder"] is not None:
        te_cls = _library_cls("transformers", names["text_encoder"], index_path)
        variant = _check_weights_dir(root / "text_encoder", "text_encoder", _TRANSFORMERS_WEIGHTS)
        # the UNet's dtype when none is asked for: transformers loads a float16 checkpoint as float16 where
        # diffusers makes the UNet float32, and float16 embeddings into a float32 UNet fail
        te_dtype = dtype if dtype is not None else unet.dtype
        with _quiet_transformers():
            te = _from_pretrained(
                te_cls,
                root / "text_encoder",
                "text_encoder",
                base=_TRANSFORMERS_KW,
                dtype=te_dtype,
                variant=variant,
            )
        extra["text_encoder"] = _finish_unet(te, device, te_dtype)
    if names["tokenizer"] is not None:
        tok_cls = _library_cls("transformers", names["tokenizer"], index_path)
        tdir = root / "tokenizer"
        if not tdir.is_dir():
            raise FileNotFoundError(f"tokenizer: directory {tdir} is missing")
        vocab = sorted(set(getattr(tok_cls, "vocab_files_names", {}).values()))
        if vocab and not any((tdir / f).is_file() for f in vocab):
            # transformers then builds a tokenizer of the special tokens alone: every prompt the same ids
            raise FileNotFoundError(f"tokenizer: {tdir} holds no vocabulary ({' or '.join(vocab)})")
        try:
            extra["tokenizer"] = tok_cls.from_pretrained(str(tdir), local_files_only=True)
        except (ValueError, OSError) as exc:  # e.g. a bare JSON decoding error that names no file
            raise ValueError(f"tokenizer: cannot load {tdir} ({type(exc).__name__}: {exc})") from None
    return _describe_unet(unet, scheduler, device, str(root), **extra)


def _load_unet_dir(d: Path, device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    variant = _check_weights_dir(d, "model")
    cfg = _read_json(d / "config.json")
    cls = _library_cls("diffusers", cfg.get("_class_name", "UNet2DModel"), d / "config.json")
    unet = _from_pretrained(cls, d, "model", torch_dtype=dtype, variant=variant)
    unet = _finish_unet(unet, device, dtype)
    scheduler = _load_scheduler_from(d) or _default_scheduler()
    return _describe_unet(unet, scheduler, device, str(d))


def _load_safetensors_file(f: Path, device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    cfg_path = f.parent / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{f} needs a config.json next to it (the UNet's diffusers config)")
    _check_safetensors(f)
    from safetensors.torch import load_file

    cfg = _read_json(cfg_path)
    cls = _library_cls("diffusers", cfg.get("_class_name", "UNet2DModel"), cfg_path)
    unet = cls.from_config(cfg)
    state = load_file(str(f))
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a weight whose shape differs from the config's (strict=False still raises)
        raise ValueError(f"{f} does not match {cfg_path}: {_first_lines(str(exc))}") from None
    if missing or unexpected:
        raise ValueError(
            f"{f} does not match {cfg_path}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    unet = _finish_unet(unet, device, dtype)
    scheduler = _load_scheduler_from(f.parent) or _default_scheduler()
    return _describe_unet(unet, scheduler, device, str(f))


def _from_object(obj: Any, device: torch.device, dtype: torch.dtype | None, scheduler: Any) -> LoadedModel:
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(obj, UNet2DConditionModel):
        raise ValueError("a bare UNet2DConditionModel cannot be sampled: pass the Stable-Diffusion pipeline")
    if isinstance(obj, UNet2DModel):
        return _describe_unet(
            _finish_unet(obj, device, dtype), scheduler or _default_scheduler(), device, type(obj).__name__
        )
    unet = getattr(obj, "unet", None)
    sched = scheduler or getattr(obj, "scheduler", None)
    if unet is None or sched is None:
        raise TypeError(
            f"cannot sample a {type(obj).__name__}: pass a path, a UNet2DModel or a diffusers pipeline with unet and "
            "scheduler"
        )
    extra = {}
    for name in ("vae", "text_encoder"):
        m = getattr(obj, name, None)
        if m is not None:
            extra[name] = _finish_unet(m, device, dtype)
    if getattr(obj, "tokenizer", None) is not None:
        extra["tokenizer"] = obj.tokenizer
    return _describe_unet(_finish_unet(unet, device, dtype), sched, device, type(obj).__name__, **extra)


def load_model(
    path_or_obj: str | os.PathLike | Any,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    scheduler: Any = None,
) -> LoadedModel:
    """Load a diffusers model or pipeline from a local path (or wrap a loaded one) for sampling.

    Args:
        path_or_obj: a pipeline directory (``model_index.json``), a model directory (``config.json`` +
            weights), a ``.safetensors`` file with ``config.json`` beside it, a ``LoadedModel`` (returned as is
            when device and dtype agree), or a loaded ``UNet2DModel`` / diffusers pipeline. A loaded object's
            modules are moved and cast in place (``Module.to``, no copy: a Stable Diffusion model is GBs), so
            the caller's object changes with them; reload it, or keep a copy, to use it at its old dtype.
        device: where to put the modules.
        dtype: parameter dtype (``torch.bfloat16`` or its name, "bfloat16"). None: a loaded object keeps its
            dtype; from a path, the UNet and VAE come as diffusers loads them (float32, a float16 checkpoint
            too) and the text encoder in the UNet's dtype.
        scheduler: a diffusers scheduler instance (``SchedulerMixin``) overriding the stored one; None keeps
            the stored one. Names such as ``"ddim"`` are not taken here (``SamplerConfig(scheduler=...)`` takes
            them).

    Returns:
        A frozen ``LoadedModel``.

    Raises:
        ValueError: a hub id that is not a local path, a corrupt safetensors file, weights that do not match
            their ``config.json`` (other shapes, missing or extra keys), an unsupported model.
        FileNotFoundError: a missing path, config or weights file.
        TypeError: a ``scheduler`` that is not a diffusers scheduler instance, a non-floating ``dtype``.
    """
    if scheduler is not None:
        from diffusers import SchedulerMixin

        if not isinstance(scheduler, SchedulerMixin):
            # a name such as "ddim" is SamplerConfig(scheduler=...)'s job: here the object itself is used
            raise TypeError(
                "scheduler must be a diffusers scheduler instance (e.g. DDIMScheduler.from_config(...)) or None, "
                f"got {type(scheduler).__name__} {scheduler!r}; to choose a sampler by name use "
                "SamplerConfig(scheduler=...)"
            )
    device = resolve_device(device)
    if isinstance(dtype, str) and dtype in ("float32", "float16", "bfloat16", "float64"):
        dtype = getattr(torch, dtype)  # the names ExtractConfig and the CLI use
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(path_or_obj, LoadedModel):
        lm = path_or_obj
        if lm.device == device and (dtype is None or lm.dtype == dtype) and scheduler is None:
            return lm
        extra = {"vae": lm.vae, "text_encoder": lm.text_encoder, "tokenizer": lm.tokenizer}
        extra = {k: v for k, v in extra.items() if v is not None}
        for k in ("vae", "text_encoder"):
            if k in extra:
                extra[k] = _finish_unet(extra[k], device, dtype)
        unet = _finish_unet(lm.unet, device, dtype)
        return _describe_unet(unet, scheduler or lm.scheduler, device, lm.source, **extra)
    if isinstance(path_or_obj, (str, os.PathLike)):
        p = Path(os.path.abspath(_check_local(path_or_obj)))  # absolute: ``source`` names it from anywhere
        if p.is_file():
            if p.suffix != ".safetensors":
                raise ValueError(f"{p}: a model file must be .safetensors (with config.json beside it)")
            lm = _load_safetensors_file(p, device, dtype)
        elif (p / "model_index.json").is_file():
            lm = _load_pipeline_dir(p, device, dtype)
        elif (p / "config.json").is_file():
            lm = _load_unet_dir(p, device, dtype)
        else:
            raise FileNotFoundError(
                f"{p} holds neither model_index.json (a pipeline) nor config.json (a model): not a diffusers model"
            )
        if scheduler is not None:
            lm = dataclasses.replace(lm, scheduler=scheduler)
        return lm
    return _from_object(path_or_obj, device, dtype, scheduler)
