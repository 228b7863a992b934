"""The embedded ZeroMQ execution server and the engine that talks to it."""

from plateflow.engines.zmq.control import stop_server
from plateflow.engines.zmq.engine import ZmqEngine
from plateflow.engines.zmq.server import ExecutionServer

__all__ = ["ExecutionServer", "ZmqEngine", "stop_server"]
