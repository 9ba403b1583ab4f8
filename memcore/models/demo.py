"""The bundled demo: tiny diffusers UNets trained on scikit-learn's ``load_digits`` with planted duplicates.

Data recipe (rebuilt bit-for-bit by :func:`demo_training_set`, no download):

- The 1,797 real 8×8 handwritten digits of ``sklearn.datasets.load_digits`` (values 0-16), scaled to [0, 1]
  and upsampled 2× to 16×16 with bilinear interpolation (half-pixel centres, edge clamped, the weights
  0.75/0.25 of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``), computed in float64
  and stored as uint8 ``round(255 * x)``. These 1,797 images are the *unique* set: the reference set that
  extraction is verified against (``nearest_train_index`` refers to it).
- **Planted images**: one image of each of the classes 0, 2, 4, 6 and 8. Each appears ``copies`` = 200 times
  in the training set (its own entry plus 199 duplicates), against ~180 distinct images per class, because
  duplication is what drives memorization in [C23] §5. The classes 1, 3, 5, 7, 9 have no planted image and
  serve as the negatives: a sound attack flags the five planted classes and not the others. Within a planted
  class the image is drawn with a fixed seed among the class's images whose nearest other digit is farther
  than 0.12 (normalized L2; the median nearest-neighbour distance among these digits is ~0.08 and the median
  distance between two digits of one class ~0.15), so the planted image is not just an ordinary digit.
- The training set is therefore 1,797 + 5 × 199 = 2,792 images: ``images[train_index]``.

The same training set trains both variants: ``cond`` (class-conditional, ``num_class_embeds=10``, the digit
is the condition) and ``uncond`` (the label is ignored). The planted indices and copy counts are stored in
``recipe.json`` next to each variant's weights; :func:`demo_training_set` reads them from there, so the
weights and the data that explain them cannot drift apart.

Model: a diffusers ``UNet2DModel`` (16×16, 1 channel, ``block_out_channels=(16, 32, 64)``, one ResNet per
level, no attention, 0.64 M parameters), epsilon prediction, 1,000 linear betas 1e-4..0.02; sample it with the
saved DDIM scheduler (50 steps, eta 0) on [-1, 1] and map to [0, 1] by ``(x + 1) / 2``.

Measured on the bundled weights (``validate_demo``, diffusers DDIM 50 steps, CPU; stored in
``validation.json`` next to the weights), at the SPEC defaults alpha = 0.1 (tiled L2, 4×4 grid),
min_clique = 10, delta = 0.15:

- ``cond``, 100 samples per class (seed 0): samples within L2 0.15 of the planted image, classes 0/2/4/6/8:
  43/29/45/52/38 %; largest clique 32/21/33/30/30, each medoid's nearest training image is the planted one
  (L2 0.010-0.019); the unplanted classes 1/3/5/7/9 have largest clique 1. Recall 5/5, 0 false positives.
  With seed 7: cliques 34/22/34/37/28, again 5/5 and 0. With only 50 samples per class (seed 1) class 2's
  clique is 9, so recall drops to 4/5: **the demo should use 100 generations per class**.
- ``uncond``, 500 samples: 30 % lie within L2 0.15 of a planted image; the largest clique is 35-44 with a
  planted image as medoid; SPEC §3's ratio test (0.5 × mean L2 to the 50 nearest, against the 1,797 unique
  digits) extracts all 5 planted images (13-50 samples each) and, with seed 0, 2 unplanted digits (index 351
  and 1256, one sample each; none with seed 7).
- CPU cost (one thread, on the shared 2-core build machine): 1,000 conditional samples × 50 steps ≈ 55-77 s,
  500 unconditional ≈ 28-45 s.

Weights live in ``memcore/models/demo_weights/{cond,uncond}/`` in diffusers' ``save_pretrained`` layout
(``config.json``, ``diffusion_pytorch_model.safetensors`` stored as float16, ``scheduler_config.json`` of a
:class:`diffusers.DDIMScheduler` with the training betas) and are reproduced by
:func:`memcore.models.train_demo.train_demo`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("cond", "uncond")
WEIGHTS_DIR = Path(__file__).resolve().parent / "demo_weights"
RECIPE_FILE = "recipe.json"
IMAGE_SIZE = 16
NUM_CLASSES = 10
# What `memcore demo` should run (measured to find 5/5 planted images at the SPEC defaults; see above).
DEMO_NUM_PER_CLASS = 100
DEMO_NUM_UNCOND = 500
DEMO_INFERENCE_STEPS = 50


@dataclass(frozen=True)
class DemoRecipe:
    """Which digits are planted and how often. Stored as ``recipe.json`` next to the weights.

    Attributes:
        planted_classes: the classes that get a planted image (one each).
        copies: how many times each planted image appears in the training set (≥ 1; 1 = not duplicated).
        seed: the seed of the choice of planted images within their classes.
        min_separation: a planted image's nearest other digit is farther than this (normalized L2, [0, 1]).
        planted_indices: the chosen images, indices into the 1,797 digits, one per planted class (same order);
            ``None`` until chosen (:func:`choose_planted`).
    """

    planted_classes: tuple[int, ...] = (0, 2, 4, 6, 8)
    copies: int = 200
    seed: int = 0
    min_separation: float = 0.12
    planted_indices: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "planted_classes", tuple(int(c) for c in self.planted_classes))
        if not self.planted_classes or len(set(self.planted_classes)) != len(self.planted_classes):
            raise ValueError(f"planted_classes must be distinct and non-empty, got {self.planted_classes}")
        if not all(0 <= c < NUM_CLASSES for c in self.planted_classes):
            raise ValueError(f"planted_classes must lie in 0..{NUM_CLASSES - 1}, got {self.planted_classes}")
        if not isinstance(self.copies, int) or self.copies < 1:
            raise ValueError(f"copies must be an int >= 1, got {self.copies!r}")
        if self.planted_indices is not None:
            object.__setattr__(self, "planted_indices", tuple(int(i) for i in self.planted_indices))
            if len(self.planted_indices) != len(self.planted_classes):
                raise ValueError("planted_indices must give one index per planted class")

    def to_json(self) -> dict:
        return {
            "planted_classes": list(self.planted_classes),
            "copies": self.copies,
            "seed": self.seed,
            "min_separation": self.min_separation,
            "planted_indices": None if self.planted_indices is None else list(self.planted_indices),
        }

    @classmethod
    def from_json(cls, d: dict) -> DemoRecipe:
        keys = {"planted_classes", "copies", "seed", "min_separation", "planted_indices"}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys})


@dataclass(frozen=True)
class DemoTrainingSet:
    """The demo's training data.

    Attributes:
        images: the 1,797 unique digits, uint8 ``[1797, 1, 16, 16]`` (the verification reference set).
        labels: their classes, int64 ``[1797]``.
        train_index: the training set as indices into ``images``, int64 ``[N_train]`` (planted ones repeated).
        planted: indices of the planted images into ``images``, one per planted class.
        planted_classes: the class of each planted image.
        copies: how many times each planted image appears in ``train_index``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    train_index: torch.Tensor
    planted: tuple[int, ...]
    planted_classes: tuple[int, ...]
    copies: int

    def training_images(self) -> torch.Tensor:
        """The images as trained on, duplicates included: uint8 ``[N_train, 1, 16, 16]``."""
        return self.images[self.train_index]

    def training_labels(self) -> torch.Tensor:
        """Classes of :meth:`training_images`: int64 ``[N_train]``."""
        return self.labels[self.train_index]

    def planted_of_class(self, c: int) -> int | None:
        """Index into ``images`` of class ``c``'s planted image, or ``None`` if it has none."""
        return dict(zip(self.planted_classes, self.planted)).get(int(c))

    def sha256(self) -> str:
        """Hash of images, labels and the training index: equal iff the recipe rebuilt the same set."""
        h = hashlib.sha256()
        for t in (self.images, self.labels, self.train_index):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 ``load_digits`` images upsampled to 16×16 (recipe in the module docstring).

    Returns:
        ``(images, labels)``: uint8 ``[1797, 1, 16, 16]`` and int64 ``[1797]``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float64) / 16.0  # [N, 8, 8] in [0, 1]
    x = _upsample2x(_upsample2x(x, axis=1), axis=2)
    imgs = np.round(x * 255.0).astype(np.uint8)[:, None]
    return torch.from_numpy(imgs), torch.from_numpy(d.target.astype(np.int64))


def _upsample2x(x: np.ndarray, axis: int) -> np.ndarray:
    """2× bilinear upsampling along ``axis`` with half-pixel centres and clamped edges (float64, exact)."""
    x = np.moveaxis(x, axis, -1)
    prev = np.concatenate([x[..., :1], x[..., :-1]], axis=-1)
    nxt = np.concatenate([x[..., 1:], x[..., -1:]], axis=-1)
    out = np.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=np.float64)
    out[..., 0::2] = 0.75 * x + 0.25 * prev
    out[..., 1::2] = 0.75 * x + 0.25 * nxt
    return np.moveaxis(out, -1, axis)


def choose_planted(recipe: DemoRecipe, images: torch.Tensor, labels: torch.Tensor) -> DemoRecipe:
    """Fill in ``recipe.planted_indices`` deterministically (a no-op when already set).

    Args:
        recipe: the recipe.
        images: uint8 ``[N, 1, 16, 16]`` from :func:`digits_16`.
        labels: int64 ``[N]``.

    Returns:
        The recipe with ``planted_indices``.
    """
    if recipe.planted_indices is not None:
        return recipe
    x = images.reshape(len(images), -1).to(torch.float64) / 255.0
    d = torch.cdist(x, x) / x.shape[1] ** 0.5  # normalized L2
    d.fill_diagonal_(float("inf"))
    nearest = d.min(dim=1).values
    rng = np.random.default_rng(recipe.seed)
    chosen = []
    for c in recipe.planted_classes:
        cand = torch.nonzero((labels == c) & (nearest > recipe.min_separation)).flatten().tolist()
        if not cand:
            raise ValueError(f"no digit of class {c} is farther than {recipe.min_separation} from all others")
        chosen.append(int(cand[int(rng.integers(len(cand)))]))
    return DemoRecipe(**{**recipe.to_json(), "planted_indices": tuple(chosen)})  # type: ignore[arg-type]


def build_training_set(recipe: DemoRecipe) -> DemoTrainingSet:
    """Build the training set of ``recipe`` (choosing the planted images if the recipe has none).

    Args:
        recipe: the recipe.

    Returns:
        The :class:`DemoTrainingSet`.
    """
    images, labels = digits_16()
    recipe = choose_planted(recipe, images, labels)
    for i, c in zip(recipe.planted_indices, recipe.planted_classes):
        if not 0 <= i < len(images) or int(labels[i]) != c:
            raise ValueError(f"planted index {i} is not an image of class {c}")
    extra = [i for i in recipe.planted_indices for _ in range(recipe.copies - 1)]
    train_index = torch.cat([torch.arange(len(images)), torch.tensor(extra, dtype=torch.int64)])
    return DemoTrainingSet(
        images=images,
        labels=labels,
        train_index=train_index,
        planted=tuple(recipe.planted_indices),
        planted_classes=recipe.planted_classes,
        copies=recipe.copies,
    )


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def demo_model_dir(variant: str = "cond") -> Path:
    """The bundled weights' directory of ``variant`` (a diffusers ``save_pretrained`` directory).

    Pass it to ``memcore.sample`` / ``memcore extract --model``.
    """
    p = WEIGHTS_DIR / _check_variant(variant)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"bundled demo weights missing: {p} (reinstall memcore or run `memcore train-demo`)"
        )
    return p


def load_recipe(model_dir: str | Path) -> DemoRecipe:
    """The :class:`DemoRecipe` stored next to a demo model's weights."""
    p = Path(model_dir) / RECIPE_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"no {RECIPE_FILE} in {model_dir}: not a demo model directory, or a train-demo save that did not finish"
        )
    return DemoRecipe.from_json(json.loads(p.read_text(encoding="utf-8")))


def demo_training_set(variant: str = "cond", *, model_dir: str | Path | None = None) -> DemoTrainingSet:
    """Rebuild the exact training set of a demo model from its ``recipe.json`` and ``load_digits``.

    Args:
        variant: ``"cond"`` or ``"uncond"`` (the bundled weights).
        model_dir: a directory written by ``train_demo`` instead of the bundled weights.

    Returns:
        The :class:`DemoTrainingSet`; ``.images`` is the reference set for verification.
    """
    d = Path(model_dir) if model_dir is not None else demo_model_dir(variant)
    return build_training_set(load_recipe(d))


def save_training_images(
    path: str | Path, variant: str = "cond", *, model_dir: str | Path | None = None
) -> Path:
    """Write the demo's unique training images as ``.npz`` (key ``images``, uint8 ``[1797, 1, 16, 16]``,
    plus ``labels``) so that they can be passed as ``--train``. Returns the path."""
    ts = demo_training_set(variant, model_dir=model_dir)
    p = Path(path)
    np.savez(p, images=ts.images.numpy(), labels=ts.labels.numpy())
    return p


def load_demo(
    variant: str = "cond", *, model_dir: str | Path | None = None, device: str | torch.device = "cpu"
):
    """Load a demo model: the UNet in float32, eval mode, and its DDIM scheduler.

    Args:
        variant: ``"cond"`` (class-conditional: pass ``class_labels`` [B] int64) or ``"uncond"``.
        model_dir: a directory written by ``train_demo`` instead of the bundled weights.
        device: where to put the UNet.

    Returns:
        ``(unet, scheduler)``: a :class:`diffusers.UNet2DModel` (input ``[B, 1, 16, 16]`` in [-1, 1]) and a
        :class:`diffusers.DDIMScheduler`.
    """
    from diffusers import DDIMScheduler, UNet2DModel

    d = Path(model_dir) if model_dir is not None else demo_model_dir(variant)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers model in {d} (config.json missing)")
    # local files only, as memcore.models.loading: a demo never reaches for the network
    unet = UNet2DModel.from_pretrained(
        d, torch_dtype=torch.float32, low_cpu_mem_usage=False, local_files_only=True
    )
    unet = unet.to(device).eval()
    scheduler = DDIMScheduler.from_pretrained(d, local_files_only=True)
    return unet, scheduler
