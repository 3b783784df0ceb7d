"""ASGI apps and process helpers for the HTTP server tests (``etcdisco.asgi``,
``etcdisco.uvicorn``, ``etcdisco serve``), run as real uvicorn processes."""
