"""The sidecar agent: registers services that cannot register themselves.

``etcdisco agent --config FILE`` keeps the registrations of a YAML or TOML file (see
:mod:`._config` for the format) alive with their health checks, reloads the file on
SIGHUP touching only what changed, and deregisters everything on SIGTERM.
"""

from ._agent import Agent, Changes, describe
from ._config import ConfigFileError, ServiceSpec, load_config, parse_config
from ._probe import ProbeServer, ReadyFile

__all__ = [
    "Agent",
    "Changes",
    "ConfigFileError",
    "ProbeServer",
    "ReadyFile",
    "ServiceSpec",
    "describe",
    "load_config",
    "parse_config",
]
