"""``CompileJob``: the immutable unit of work the service hands an engine."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plateflow.pipeline.spec import PipelineSpec

__all__ = ["CompileJob"]


class CompileJob(BaseModel):
    """One plate to compile (and later execute): which plate, where, with what.

    ``fingerprint`` is the content hash of the pipeline and config; engines
    store compile artifacts under it, so plates sharing a pipeline share one
    artifact.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    plate_id: str = Field(min_length=1)
    plate_path: str
    pipeline: PipelineSpec
    config: dict[str, JsonValue] = Field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(
            {"pipeline": self.pipeline.model_dump(mode="json"), "config": self.config},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
