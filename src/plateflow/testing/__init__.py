"""plateflow.testing: check your host against every legal engine-fact ordering.

- :class:`FakeEngine` — a scripted, deterministic engine driven step by step;
- :class:`RecordingHost` — a host that records every callback with the
  stores it could see and the thread it ran on;
- :class:`ServiceHarness` — the real service, a fake engine and your host in
  virtual time, checking guarantees C1-C7 as callbacks happen;
- :mod:`plateflow.testing.strategies` — Hypothesis strategies for
  engine-fact orderings (:func:`scenarios`);
- :class:`HostStateMachine` — the stateful test you subclass with a factory
  for your host;
- a pytest plugin (registered automatically) with fixtures and the
  Hypothesis profiles ``dev`` / ``ci`` / ``nightly``.

See ``docs/testing.md`` ("Testing your host").
"""

from plateflow.testing._loop import LoopStalled, VirtualClock, VirtualTimeLoop
from plateflow.testing.fake_engine import EngineCall, FakeEngine, Outcome, Pending, PlateScript
from plateflow.testing.harness import (
    GUARANTEES,
    GuaranteeViolation,
    InjectedFault,
    ObservedCall,
    QueuedDispatcher,
    ServiceHarness,
)
from plateflow.testing.recording import Call, HostView, RecordingHost
from plateflow.testing.stateful import HostStateMachine
from plateflow.testing.strategies import Scenario, plate_scripts, scenarios

__all__ = [
    "GUARANTEES",
    "Call",
    "EngineCall",
    "FakeEngine",
    "GuaranteeViolation",
    "HostStateMachine",
    "HostView",
    "InjectedFault",
    "LoopStalled",
    "ObservedCall",
    "Outcome",
    "Pending",
    "PlateScript",
    "QueuedDispatcher",
    "RecordingHost",
    "Scenario",
    "ServiceHarness",
    "VirtualClock",
    "VirtualTimeLoop",
    "plate_scripts",
    "scenarios",
]
