"""What a balancing channel is whatever its flavour: a view of its pool, and the
factories of its multicallables.

The sync and aio channels derive from :class:`ChannelBase` and add what differs:
connectivity (callbacks from grpc's threads, or awaitable state changes), closing, and
the two facts about their calls declared at the bottom (their UNAVAILABLE error, and
how a finished call's status is read).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from .._model import Instance
from ._options import ChannelSettings
from ._pool import Pool, SubChannelInfo

C = TypeVar("C")


def _factory(kind: str) -> Callable[..., Any]:
    """grpc's four multicallable factories differ only by kind: one makes them all."""

    def make(
        self: ChannelBase[Any],
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        return self._multicallables[kind](
            self, kind, method, request_serializer, response_deserializer
        )

    make.__name__ = kind
    make.__qualname__ = f"ChannelBase.{kind}"
    make.__doc__ = f"A balancing ``{kind}`` multicallable (grpc's other arguments are ignored)."
    return make


class ChannelBase(Generic[C]):
    """The flavour-free part of a balancing channel over sub-channels of type ``C``."""

    _pool: Pool[C]
    _settings: ChannelSettings
    # The flavour's multicallable class for each kind; each is a _calls.MethodRouter.
    _multicallables: ClassVar[Mapping[str, Callable[..., Any]]]

    @property
    def service(self) -> str:
        return self._settings.service

    @property
    def pool(self) -> Pool[C]:
        return self._pool

    def instances(self) -> tuple[Instance, ...]:
        """The instances this channel has a sub-channel for (draining ones included)."""
        return self._pool.instances()

    def subchannels(self) -> tuple[SubChannelInfo, ...]:
        """Every open sub-channel, retired ones still finishing calls included."""
        return self._pool.info()

    unary_unary = _factory("unary_unary")
    unary_stream = _factory("unary_stream")
    stream_unary = _factory("stream_unary")
    stream_stream = _factory("stream_stream")

    def _no_instance(self, details: str) -> Exception:
        """The flavour's UNAVAILABLE error when no instance can take a call."""
        raise NotImplementedError

    @staticmethod
    def _finished_code(call: Any) -> grpc.StatusCode | None:
        """The status of a finished call, read from its done callback."""
        raise NotImplementedError
