"""gRPC health protocol check (grpc.health.v1.Health/Check).

The two messages involved have one field each, so they are encoded here by hand:
the check then needs only grpcio, not the ``grpc`` extra's grpcio-health-checking.
Each probe dials a fresh channel, as Kubernetes' gRPC probes do: a long-lived
channel would answer from its reconnect backoff (up to minutes) instead of asking
the server whether it is back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import grpc
import grpc.aio

from .._address import normalize_address
from .._errors import ConfigError
from ._check import Check
from ._result import Outcome

_METHOD = "/grpc.health.v1.Health/Check"

# HealthCheckResponse.ServingStatus
_UNKNOWN, _SERVING, _NOT_SERVING, _SERVICE_UNKNOWN = 0, 1, 2, 3


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """HealthCheckRequest{service}: field 1, length-delimited (empty when "")."""
    data = service.encode("utf-8")
    return b"\x0a" + _varint(len(data)) + data if data else b""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode_status(data: bytes) -> int:
    """HealthCheckResponse.status (field 1, varint); unknown fields are skipped."""
    status = _UNKNOWN
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
    return status


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class GrpcCheck(Check):
    """Asks ``target`` (``host:port``; default: the registration's address) for the
    health of ``service`` ("" asks about the server as a whole). Plaintext only."""

    target: str | None = None
    service: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is not None:
            object.__setattr__(self, "target", normalize_address(self.target))
        if not isinstance(self.service, str):
            raise ConfigError(f"service must be a string, not {self.service!r}")

    def bind(self, address: str) -> GrpcCheck:
        return self if self.target is not None else dataclasses.replace(self, target=address)

    def describe(self) -> str:
        where = self.target or "<registration address>"
        return f"grpc://{where}" + (f"/{self.service}" if self.service else "")

    async def probe(self) -> Outcome:
        if self.target is None:
            raise ConfigError("GrpcCheck has no target: give one or attach it to a registration")
        async with grpc.aio.insecure_channel(
            self.target, options=[("grpc.enable_retries", 0)]
        ) as channel:
            check = channel.unary_unary(
                _METHOD, request_serializer=_identity, response_deserializer=_identity
            )
            try:
                reply = await check(encode_request(self.service), timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                return _rpc_failure(exc, self.service)
        try:
            status = decode_status(reply)
        except ValueError as exc:
            return Outcome.failing(f"malformed health response: {exc}")
        if status == _SERVING:
            return Outcome.passing("SERVING")
        if status == _UNKNOWN:
            return Outcome.unknown("UNKNOWN")
        name = {_NOT_SERVING: "NOT_SERVING", _SERVICE_UNKNOWN: "SERVICE_UNKNOWN"}
        return Outcome.failing(name.get(status, f"status {status}"))


def _rpc_failure(exc: grpc.aio.AioRpcError, service: str) -> Outcome:
    code = exc.code()
    if code is grpc.StatusCode.NOT_FOUND:
        return Outcome.failing(f"the server does not know service {service!r}")
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return Outcome.failing("the server has no grpc.health.v1 health service")
    return Outcome.failing(f"{code.name}: {exc.details() or ''}".rstrip(": "))
