"""Input readers: training images (:mod:`memcore.io.data`) and conditions/prompts (:mod:`memcore.io.prompts`)."""

from __future__ import annotations

from memcore.io.data import TrainingSet, load_images, open_training_set
from memcore.io.prompts import load_conditions, parse_classes

__all__ = ["TrainingSet", "load_conditions", "load_images", "open_training_set", "parse_classes"]
