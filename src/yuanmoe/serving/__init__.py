"""Serving a model over HTTP with an OpenAI-compatible API."""

from .app import create_app
from .scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
