"""Active health checks, independent of etcd and reusable on their own.

Every check implements one interface (:class:`Check`): ``await check.probe()``
returns an :class:`Outcome` that is passing, failing or unknown; the check's
``interval``, ``timeout``, ``rise``, ``fall`` and ``jitter`` say how it is run.
A :class:`HealthMonitor` owns one task per check, damps flapping with the rise/fall
thresholds and reports the combined state (failing if any check fails, passing if
all pass, unknown before any verdict).

Given to a registration (``client.register(..., checks=[...])``), checks make the
instance mark itself ``unhealthy`` (or withdraw its key) while failing, under the
same lease.
"""

from ._check import (
    DEFAULT_FALL,
    DEFAULT_INTERVAL,
    DEFAULT_JITTER,
    DEFAULT_RISE,
    DEFAULT_TIMEOUT,
    Check,
    run_probe,
)
from ._command import CommandCheck
from ._grpc import GrpcCheck
from ._guard import OnFailing
from ._http import HttpCheck
from ._monitor import CheckRunner, HealthMonitor
from ._result import CheckResult, Outcome
from ._spec import SPEC_HELP, parse_check
from ._tcp import TcpCheck
from ._thresholds import Thresholds

__all__ = [
    "DEFAULT_FALL",
    "DEFAULT_INTERVAL",
    "DEFAULT_JITTER",
    "DEFAULT_RISE",
    "DEFAULT_TIMEOUT",
    "SPEC_HELP",
    "Check",
    "CheckResult",
    "CheckRunner",
    "CommandCheck",
    "GrpcCheck",
    "HealthMonitor",
    "HttpCheck",
    "OnFailing",
    "Outcome",
    "TcpCheck",
    "Thresholds",
    "parse_check",
    "run_probe",
]
