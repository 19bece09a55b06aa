"""The serving engine: phases, pools and one pipeline per model (admit → prepare → submit → results)."""

from service.engine.engine import Engine, Phase
from service.engine.pipeline import ModelPipeline

__all__ = ["Engine", "ModelPipeline", "Phase"]
