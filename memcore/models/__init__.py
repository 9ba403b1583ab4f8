"""Loading diffusers models and pipelines from local paths (``load_model``); the bundled demo model lives
beside it (``memcore.models.demo``); ``weights_sha256`` is the weights' digest a results directory records."""

from memcore.models.fingerprint import weights_sha256
from memcore.models.loading import KINDS, LoadedModel, load_model

__all__ = ["KINDS", "LoadedModel", "load_model", "weights_sha256"]
