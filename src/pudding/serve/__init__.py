"""`pudding serve`: an OpenAI-compatible server over the engine. `wire.py` is the OpenAI wire format, `service.py` the
job queue on the engine thread, `app.py` the HTTP app."""

from .app import check_port, create_app, serve
from .service import Service, StopScanner

__all__ = ["Service", "StopScanner", "check_port", "create_app", "serve"]
