"""The engine's typed errors (the server maps them to OpenAI-shaped HTTP errors)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot accept (bad prompt, too long, duplicate id, ...): the caller's fault."""


class EngineStepError(RuntimeError):
    """An engine step failed while computing these requests (the engine's fault). They were ended
    and their pages freed; the engine goes on serving other requests."""

    def __init__(self, message: str, request_ids: list[str] | None = None):
        super().__init__(message)
        self.request_ids = list(request_ids or [])
