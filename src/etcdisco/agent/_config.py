"""The agent's config file (YAML or TOML): parsed, validated, turned into specs.

Every error names the file, the line when the format tells it (YAML), and the field
as a path (``services[1].checks[0].interval``), so a typo in a sidecar's config is
found from the first log line; a file with several errors gets all of them at once
(:class:`ConfigFileError`). Unknown fields are errors, not ignored: a misspelt
``intervall`` would otherwise silently run the default. Check kinds are named as on
the command line (``--check exec:...`` is ``exec:`` here too).

    defaults:                 # optional; apply to every service
      ttl: 10
      on_failing: mark        # or withdraw
      interval: 5             # check timing: interval, timeout, rise, fall, jitter
    services:
      - name: web
        address: 127.0.0.1:8080
        id: web-1             # default: the address
        metadata: {zone: a, weight: 2}
        checks:
          - http: http://127.0.0.1:8080/healthz
            status: [200, 299]
          - tcp                # short form: the registration's own address
          - exec: [pg_isready, -q]
"""

from __future__ import annotations

import functools
import importlib
import shlex
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from .._address import normalize_address
from .._errors import ConfigError, EtcdiscoError
from .._metadata import check_metadata
from .._model import encode_value, instance_key, validate_instance_id, validate_service_name
from ..health import Check, CommandCheck, GrpcCheck, HttpCheck, TcpCheck, parse_check
from ..health._guard import OnFailing
from ..registry import validate_ttl

FieldPath = tuple[str | int, ...]
T = TypeVar("T")

_TIMING = ("interval", "timeout", "rise", "fall", "jitter")
_TOP_FIELDS = ("defaults", "services")
_DEFAULT_FIELDS = ("ttl", "on_failing", *_TIMING)
_SERVICE_FIELDS = ("name", "address", "id", "ttl", "metadata", "on_failing", "checks")
_CHECK_KINDS = ("http", "tcp", "grpc", "exec")
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "http": ("status", "verify_tls", "ca"),
    "tcp": (),
    "grpc": ("service",),
    "exec": (),
}
# Names of check kinds elsewhere, told apart from a typo in the error.
_RENAMED = {"command": "exec"}


@dataclass(frozen=True)
class ServiceSpec:
    """One registration the agent keeps. Equal specs mean an untouched registration."""

    name: str
    address: str
    instance_id: str | None = None
    ttl: int = 10
    metadata: Mapping[str, Any] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    on_failing: OnFailing = OnFailing.MARK

    def key(self, prefix: str) -> str:
        return instance_key(prefix, self.name, self.instance_id or self.address)

    def only_metadata_differs(self, other: ServiceSpec) -> bool:
        """True when ``other`` can be applied as a metadata update in place."""
        return self != other and replace(other, metadata=self.metadata) == self


class ConfigFileError(ConfigError):
    """A config file that does not validate: every error found in it, one line each
    (``errors``), each naming the file, the line (YAML) and the field."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = tuple(errors)


class _Located(ConfigError):
    """A config error that already names its file, line and field."""


class _Source:
    """Where values came from, to name them in errors; collects the errors found."""

    def __init__(self, name: str, lines: Mapping[FieldPath, int]) -> None:
        self.name = name
        self.lines = lines
        self.errors: list[str] = []

    def attempt(self, parse: Callable[[], T]) -> T | None:
        """``parse()``, or None with its error recorded, so parsing goes on to find the
        next one."""
        try:
            return parse()
        except _Located as exc:
            self.errors.append(str(exc))
            return None

    def note(self, error: _Located) -> None:
        self.errors.append(str(error))

    def error(self, path: FieldPath, message: str) -> _Located:
        line = None
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                break
        where = f"{self.name}:{line}" if line is not None else self.name
        dotted = _dotted(path)
        return _Located(f"{where}: {dotted}: {message}" if dotted else f"{where}: {message}")


def _dotted(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _mapping(src: _Source, path: FieldPath, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a mapping; each unknown field is an error (recorded, not raised:
    the known ones are still checked)."""
    if not isinstance(value, dict):
        raise src.error(path, f"must be a mapping, not {_kind(value)}")
    for name in value:
        if name not in allowed:
            message = f"unknown field; expected one of: {', '.join(allowed)}"
            if _RENAMED.get(str(name)) in allowed:
                message = f"unknown field; it is called {_RENAMED[str(name)]!r}"
            src.note(src.error((*path, str(name)), message))
    return {k: v for k, v in value.items() if k in allowed}


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _string(src: _Source, path: FieldPath, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise src.error(path, f"must be a non-empty string, not {_kind(value)}")
    return value


def _validated(src: _Source, path: FieldPath, value: Any, check: Callable[[str], str]) -> str:
    text = _string(src, path, value)
    try:
        return check(text)
    except ConfigError as exc:
        raise src.error(path, str(exc)) from None


def load_config(path: str | Path) -> tuple[ServiceSpec, ...]:
    """Read, parse and validate the agent config at ``path`` (``.yaml``, ``.yml`` or
    ``.toml``); raises ConfigError naming the file, line and field at fault
    (:class:`ConfigFileError`, with every error, when the file does not validate)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return parse_config(data, _Source(str(path), {}))
    if suffix in (".yaml", ".yml"):
        data, lines = _load_yaml(path, text)
        return parse_config(data, _Source(str(path), lines))
    raise ConfigError(f"{path}: unknown config format; name the file .yaml, .yml or .toml")


def _load_yaml(path: Path, text: str) -> tuple[Any, dict[FieldPath, int]]:
    try:
        # Imported by name: PyYAML ships no type stubs, and the agent extra is optional.
        yaml: Any = importlib.import_module("yaml")
    except ImportError:
        raise ConfigError(
            "YAML configs need PyYAML: pip install 'etcdisco[agent]' (or use TOML)"
        ) from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[FieldPath, int] = {}

    def walk(node: Any, at: FieldPath) -> None:
        lines[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*at, str(key_node.value))
                walk(value_node, child)
                lines[child] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*at, index))

    if root is not None:
        walk(root, ())
    return data, lines


def parse_config(data: Any, src: _Source | None = None) -> tuple[ServiceSpec, ...]:
    """Validate an already-parsed config document (what YAML or TOML produced); raises
    :class:`ConfigFileError` with every error found."""
    src = src or _Source("<config>", {})
    specs = _parse(data, src)
    if src.errors:
        # One wrong default is one error, however many services use it.
        raise ConfigFileError(list(dict.fromkeys(src.errors)))
    assert specs is not None
    return specs


def _parse(data: Any, src: _Source) -> tuple[ServiceSpec, ...] | None:
    if data is None:
        data = {}
    top = src.attempt(lambda: _mapping(src, (), data, _TOP_FIELDS))
    if top is None:
        return None
    defaults = src.attempt(
        lambda: _mapping(src, ("defaults",), top.get("defaults") or {}, _DEFAULT_FIELDS)
    )
    services = top.get("services")
    if services is None:
        services = []
    if not isinstance(services, list):
        src.note(src.error(("services",), f"must be a list of services, not {_kind(services)}"))
        return None
    specs: list[ServiceSpec] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(services):
        spec = _service(src, ("services", index), raw, defaults or {})
        if spec is None:
            continue
        key = f"{spec.name}/{spec.instance_id or spec.address}"
        if key in seen:
            src.note(
                src.error(
                    ("services", index),
                    f"registers the same instance as services[{seen[key]}] ({key}); give one an id",
                )
            )
            continue
        seen[key] = index
        specs.append(spec)
    return tuple(specs)


def _service(
    src: _Source, path: FieldPath, raw: Any, defaults: dict[str, Any]
) -> ServiceSpec | None:
    """One service, or None with its errors (all of them) recorded in ``src``."""
    item = src.attempt(lambda: _mapping(src, path, raw, _SERVICE_FIELDS))
    if item is None:
        return None
    found = len(src.errors)
    for required in ("name", "address"):
        if required not in item:
            src.note(src.error(path, f"missing field {required!r}"))
    name = address = instance_id = None
    if "name" in item:
        name = src.attempt(
            lambda: _validated(src, (*path, "name"), item["name"], validate_service_name)
        )
    if "address" in item:
        address = src.attempt(
            lambda: _validated(src, (*path, "address"), item["address"], normalize_address)
        )
    if item.get("id") is not None:
        instance_id = src.attempt(
            lambda: _validated(src, (*path, "id"), item["id"], validate_instance_id)
        )
    ttl = src.attempt(lambda: _ttl(src, path, item, defaults))
    metadata = src.attempt(lambda: _metadata(src, path, item, address))
    mode = src.attempt(lambda: _on_failing(src, path, item, defaults))
    checks: list[Check | None] = []
    raw_checks = item.get("checks") or []
    if not isinstance(raw_checks, list):
        src.note(src.error((*path, "checks"), f"must be a list of checks, not {_kind(raw_checks)}"))
    else:
        timing = {k: defaults[k] for k in _TIMING if k in defaults}
        for i, check in enumerate(raw_checks):
            at = (*path, "checks", i)
            checks.append(src.attempt(functools.partial(_check, src, at, check, timing)))
    if len(src.errors) > found:
        return None
    assert name is not None and address is not None and ttl is not None and mode is not None
    valid = tuple(c for c in checks if c is not None)
    return ServiceSpec(name, address, instance_id, ttl, metadata or {}, valid, mode)


def _ttl(src: _Source, path: FieldPath, item: dict[str, Any], defaults: dict[str, Any]) -> int:
    at = (*path, "ttl") if "ttl" in item else ("defaults", "ttl")
    try:
        return validate_ttl(item.get("ttl", defaults.get("ttl", 10)))
    except ConfigError as exc:
        raise src.error(at, str(exc)) from None


def _metadata(
    src: _Source, path: FieldPath, item: dict[str, Any], address: str | None
) -> dict[str, Any]:
    at = (*path, "metadata")
    metadata = item.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise src.error(at, f"must be a mapping, not {_kind(metadata)}")
    bad = None
    for name, value in metadata.items():
        try:
            check_metadata({name: value})  # the reserved keys' types, as registering does
        except ConfigError as exc:
            bad = src.error((*at, str(name)), str(exc))
            src.note(bad)
    if bad is not None:
        return metadata
    try:
        encode_value(address or "127.0.0.1:1", metadata)
    except ConfigError as exc:
        raise src.error(at, str(exc)) from None
    return metadata


def _on_failing(
    src: _Source, path: FieldPath, item: dict[str, Any], defaults: dict[str, Any]
) -> OnFailing:
    at = (*path, "on_failing") if "on_failing" in item else ("defaults", "on_failing")
    try:
        return OnFailing(item.get("on_failing", defaults.get("on_failing", "mark")))
    except ValueError:
        raise src.error(at, "must be 'mark' or 'withdraw'") from None


def _check(src: _Source, path: FieldPath, raw: Any, timing: dict[str, Any]) -> Check:
    try:
        if isinstance(raw, str):
            return parse_check(raw, **timing)
        if not isinstance(raw, dict):
            raise src.error(path, f"must be a check (a string or a mapping), not {_kind(raw)}")
        kinds = [k for k in _CHECK_KINDS if k in raw]
        if not kinds:
            for old, new in _RENAMED.items():
                if old in raw:
                    raise src.error(
                        (*path, old),
                        f"unknown check; it is called {new!r} (as in --check {new}:...)",
                    )
        if len(kinds) != 1:
            raise src.error(path, f"needs exactly one of: {', '.join(_CHECK_KINDS)}")
        kind = kinds[0]
        item = _mapping(src, path, raw, (kind, *_TIMING, *_KIND_FIELDS[kind]))
        options = {**timing, **{k: item[k] for k in _TIMING if k in item}}
        target = item[kind]
        if kind == "http":
            return HttpCheck(
                _string(src, (*path, kind), target),
                status=tuple(item.get("status", (200, 399))),
                verify_tls=item.get("verify_tls", True),
                ca=item.get("ca"),
                **options,
            )
        if kind == "exec":
            argv = shlex.split(target) if isinstance(target, str) else target
            return CommandCheck(tuple(argv) if isinstance(argv, list) else argv, **options)
        # tcp / grpc: empty (YAML null, TOML "") means the registration's own address.
        if target not in (None, "") and not isinstance(target, str):
            raise src.error((*path, kind), f"must be host:port or empty, not {_kind(target)}")
        address = target or None
        if kind == "tcp":
            return TcpCheck(address, **options)
        return GrpcCheck(address, service=item.get("service", ""), **options)
    except _Located:
        raise
    except ConfigError as exc:
        field_name = str(exc).split(" ", 1)[0]
        at = (*path, field_name) if isinstance(raw, dict) and field_name in raw else path
        raise src.error(at, str(exc)) from None
    except (TypeError, ValueError, EtcdiscoError) as exc:
        raise src.error(path, str(exc)) from None
