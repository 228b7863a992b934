"""``CompileJob``: the immutable unit of work the service hands an engine, and what a
plate id may be.

The plate-id rule is checked once, at the service's door
(:meth:`plateflow.BatchWorkflowService.run_plates`), the same for every engine:
a plate whose id breaks it is rejected there (``compile_rejected``, the
error saying why) and never reaches an engine, so no engine, wire or file
name has to cope with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plateflow.pipeline.spec import PipelineSpec

__all__ = ["MAX_PLATE_ID_LENGTH", "CompileJob", "plate_id_problem"]

MAX_PLATE_ID_LENGTH: Final = 512
"""A plate id has at most this many characters (and at least one)."""
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode's control characters (category Cc), exactly."""


def plate_id_problem(plate_id: str) -> str | None:
    """Why ``plate_id`` cannot be used as a plate id, or None when it can.

    A plate id is 1 to :data:`MAX_PLATE_ID_LENGTH` characters of Unicode text
    (no lone surrogates) with no control characters (Unicode category Cc:
    newlines, tabs, NUL, escape...): it appears in journals, terminals, log
    lines and on the wire.
    """
    if not plate_id:
        return "the plate id is empty"
    if len(plate_id) > MAX_PLATE_ID_LENGTH:
        return (
            f"the plate id has {len(plate_id)} characters; at most {MAX_PLATE_ID_LENGTH} "
            "are allowed"
        )
    try:
        plate_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"the plate id is not valid Unicode text (a lone surrogate at character {exc.start})"
    control = _CONTROL.search(plate_id)
    if control is not None:
        return (
            f"the plate id has a control character ({control.group()!r}) at character "
            f"{control.start()}"
        )
    return None


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
