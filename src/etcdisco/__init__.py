"""etcdisco: service registration and discovery for Python services on etcd.

Register an instance under a lease that is kept alive and healed; discover instances
through a local cache that follows etcd; pick one with a balancing policy. Keys and
values use etcd's own naming format, so Go services using etcd's resolver and Python
services see each other.
"""

from ._address import parse_address
from ._advertise import advertised_address, primary_ip
from ._async_client import AsyncClient
from ._errors import (
    AuthError,
    ClosedError,
    CompactedError,
    ConfigError,
    EtcdError,
    EtcdiscoError,
    EtcdTimeoutError,
    InvalidAddressError,
    LeaseNotFoundError,
    MalformedValueError,
    RegistrationError,
    UnavailableError,
)
from ._expiry import ExpiryProtection
from ._metadata import RESERVED_METADATA, ReservedKey
from ._model import (
    DEFAULT_PREFIX,
    ChangeEvent,
    EventType,
    Instance,
    Override,
    Status,
    decode_instance,
    decode_value,
    encode_value,
    usable,
)
from ._settings import ClientSettings
from .balancing import (
    BasePicker,
    Picker,
    PowerOfTwoChoices,
    Random,
    RingHash,
    RoundRobin,
    WeightedRoundRobin,
    ZoneAware,
    make_picker,
)
from .discovery import CacheState, ServiceCache
from .outlier import OutlierDetector
from .registry import Registration, RegistrationState
from .sync import Client, SyncEventStream, SyncRegistration, SyncServiceCache

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PREFIX",
    "RESERVED_METADATA",
    "AsyncClient",
    "AuthError",
    "BasePicker",
    "CacheState",
    "ChangeEvent",
    "Client",
    "ClientSettings",
    "ClosedError",
    "CompactedError",
    "ConfigError",
    "EtcdError",
    "EtcdTimeoutError",
    "EtcdiscoError",
    "EventType",
    "ExpiryProtection",
    "Instance",
    "InvalidAddressError",
    "LeaseNotFoundError",
    "MalformedValueError",
    "OutlierDetector",
    "Override",
    "Picker",
    "PowerOfTwoChoices",
    "Random",
    "Registration",
    "RegistrationError",
    "RegistrationState",
    "ReservedKey",
    "RingHash",
    "RoundRobin",
    "ServiceCache",
    "Status",
    "SyncEventStream",
    "SyncRegistration",
    "SyncServiceCache",
    "UnavailableError",
    "WeightedRoundRobin",
    "ZoneAware",
    "__version__",
    "advertised_address",
    "decode_instance",
    "decode_value",
    "encode_value",
    "make_picker",
    "parse_address",
    "primary_ip",
    "usable",
]
