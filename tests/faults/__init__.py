"""Fault-injection tooling for the reliability suite (see tests/faults/proxy.py for the proxy's semantics)."""

from tests.faults.blackhole import BlackholeServer, RequestLog, S3ErrorServer
from tests.faults.framing import Message, Protocol, mongo_command
from tests.faults.http_faults import S3Error
from tests.faults.proxy import (
    Blackhole,
    Delay,
    Direction,
    Fault,
    FaultEvent,
    FaultProxy,
    FlipByte,
    MessageRecord,
    ProxyStats,
    Refuse,
    ResetAfterBytes,
    ResetBeforeResponse,
    Respond,
)
from tests.faults.rates import max_rate

__all__ = [
    "Blackhole",
    "BlackholeServer",
    "Delay",
    "Direction",
    "Fault",
    "FaultEvent",
    "FaultProxy",
    "FlipByte",
    "Message",
    "MessageRecord",
    "Protocol",
    "ProxyStats",
    "Refuse",
    "RequestLog",
    "ResetAfterBytes",
    "ResetBeforeResponse",
    "Respond",
    "S3Error",
    "S3ErrorServer",
    "max_rate",
    "mongo_command",
]
