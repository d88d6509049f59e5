"""Domain errors raised at the edge; each API renders them in its own error shape."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlx_flash.engine.request import Failed


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ApiError):
    pass


class Unauthorized(ApiError):
    status = 401
    code = "invalid_api_key"


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str, why: str = "it does not exist or is not served here") -> None:
        super().__init__(f"The model '{model}' is not available: {why}.", "model")


class RouteNotFound(ApiError):
    status = 404
    code = "unknown_url"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    code = "request_too_large"


class ContextLengthExceeded(ApiError):
    code = "context_length_exceeded"


class MemoryExceeded(ApiError):
    """The request could never fit: its KV cache alone is larger than the memory limit allows."""

    code = "insufficient_memory"


class Overloaded(ApiError):
    """Cannot be admitted now (memory or queue); the client should retry later."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ModelTooLarge(ApiError):
    """The model can never fit under the memory limit; retrying will not help."""

    status = 503
    type = "server_error"
    code = "model_too_large"

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"}


class Conflict(ApiError):
    status = 409
    code = "conflict"


class InternalError(ApiError):
    status = 500
    type = "server_error"

    def __init__(self, message: str = "The server had an error while processing your request.") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        # Retrying a bug does not fix it; the openai SDK honours this header.
        return {"x-should-retry": "false"}


def generation_failed(failed: Failed, started: bool = False) -> InternalError:
    """What a client is told of a failed generation: the engine's message when it is for the client
    (the model's files became unreadable), else only that the server failed."""
    if failed.public:
        return InternalError(failed.message)
    return InternalError("Generation failed after the response started.") if started else InternalError()
