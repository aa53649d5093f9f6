"""Serving: `cepe serve`, an OpenAI-compatible HTTP server with an encode-once document store."""

from .app import ServeConfig, create_app
from .store import DocumentStore

__all__ = ["DocumentStore", "ServeConfig", "create_app"]
