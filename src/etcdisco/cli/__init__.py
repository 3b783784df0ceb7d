"""The ``etcdisco`` command line, one module per command family.

- ``_common``: the global options, defined once and taken before or after the
  command (one :class:`~etcdisco.ClientSettings` per invocation, plus ``--json`` /
  ``--log-level``), the ``command`` decorator every command is made with, errors,
  signals and output helpers; it imports no command module.
- ``_main``: the group, ``register``, ``list``, ``watch``, ``etcd``, ``demo``; it
  wires in the families below.
- ``_agent`` (``agent``, and the ``--check`` / probe options of ``register``),
  ``_resolve`` (``resolve``), ``_xds`` (``xds``), ``_metrics`` (``--metrics-listen``),
  ``_serve`` (``serve``: an ASGI app under uvicorn, registered and drained).

``main`` is the console entry point (``etcdisco``, ``python -m etcdisco``); ``cli``
is the click group.
"""

from ._main import cli, main

__all__ = ["cli", "main"]
