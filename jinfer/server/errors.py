"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a fitting status.

Handlers raise `APIError`; one exception handler turns it into the response. The `openai`
client maps the status to its exception class (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 422 UnprocessableEntityError, 429 RateLimitError, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """422 from pydantic's errors, naming the offending field and what was wrong with it."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = loc[0] if loc else None
    same_field = all(
        [str(x) for x in e.get("loc", ()) if x != "body"][:1] == loc[:1] for e in errors
    )
    if len(errors) > 1 and same_field and field is not None:
        # A union (e.g. prompt: str | list[str] | list[int]) fails once per alternative.
        got = repr(first.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        message = f"{field}: wrong type or shape, got {got}"
    else:
        message = f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}" if loc else first["msg"]
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
    return APIError(422, message, param=field, code="invalid_type")
