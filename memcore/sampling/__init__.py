"""Sampling: the batched engine (fixed micro-batch, fused or diffusers step, CUDA graphs), seeds, streaming.

``sample`` is SPEC §7's ``memcore.sample``; ``stream`` yields device batches for the extraction stage.
"""

from memcore.sampling.api import sample, stream
from memcore.sampling.engine import SampleBatch, Sampler, SamplerConfig, to_uint8
from memcore.sampling.seeds import initial_noise, philox4x32_10, step_noise

__all__ = [
    "SampleBatch",
    "Sampler",
    "SamplerConfig",
    "initial_noise",
    "philox4x32_10",
    "sample",
    "step_noise",
    "stream",
    "to_uint8",
]
