"""Domain errors raised at the edge; each API renders them in its own error shape."""

from __future__ import annotations


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

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or is not served here.", "model")


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


class NotReady(ApiError):
    status = 503
    type = "server_error"
    code = "model_loading"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class InternalError(ApiError):
    status = 500
    type = "server_error"

    def __init__(self, message: str = "The server had an error while processing your request.") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        # Retrying a bug does not fix it; the openai SDK honours this header.
        return {"x-should-retry": "false"}
