"""Pipelines: step specs, compile (resolve, validate, fingerprint) and execute."""

from plateflow.pipeline.run import (
    DEFAULT_ALLOWED_MODULES,
    STEP_UNITS,
    CompiledPipeline,
    PipelineError,
    StepCancelled,
    StepContext,
    StepFailed,
    compile_pipeline,
    execute_pipeline,
    fingerprint,
)
from plateflow.pipeline.spec import PipelineSpec, StepSpec

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "STEP_UNITS",
    "CompiledPipeline",
    "PipelineError",
    "PipelineSpec",
    "StepCancelled",
    "StepContext",
    "StepFailed",
    "StepSpec",
    "compile_pipeline",
    "execute_pipeline",
    "fingerprint",
]
