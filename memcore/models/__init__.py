"""Loading diffusers models and pipelines from local paths (``load_model``); the bundled demo model lives
beside it (``memcore.models.demo``)."""

from memcore.models.loading import KINDS, LoadedModel, load_model

__all__ = ["KINDS", "LoadedModel", "load_model"]
