"""Pipeline specifications: what a pipeline is, as data that can cross a wire.

A pipeline is an ordered list of steps; a step names a function as
``module:function`` and the keyword parameters to call it with. Specs are
pydantic models so batch files, wire messages and journals all carry the same
JSON, and nothing is ever pickled.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue

__all__ = ["PipelineSpec", "StepSpec"]


class StepSpec(BaseModel):
    """One step: the function to call (``package.module:function``) and its parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    params: dict[str, JsonValue] = Field(default_factory=dict)


class PipelineSpec(BaseModel):
    """An ordered, non-empty list of steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "pipeline"
    steps: tuple[StepSpec, ...] = Field(min_length=1)
