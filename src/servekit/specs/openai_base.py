"""What the OpenAI-compatible specs share in the HTTP front: routes, body parsing, errors, disconnects."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from servekit.errors import ServerError
from servekit.openai.errors import OpenAIError, parse_body
from servekit.specs.base import LitSpec

if TYPE_CHECKING:
    from servekit.api import LitAPI

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

_DEFAULT_LIT_API_PATH = "/predict"


class OpenAIBaseSpec(LitSpec):
    """Base of the OpenAI specs: registers their routes in ``pre_setup`` and shapes their errors.

    Routes are registered once the API is known, so that a custom ``api_path`` given to the
    ``LitAPI`` (or ``LitServer``) replaces the default path, as in LitServe.
    """

    default_api_path = "/v1"

    def __init__(self) -> None:
        super().__init__()
        self.api_path = self.default_api_path
        self._registered: list[tuple[str, str]] = []

    # --------------------------------------------------------------- set-up
    def pre_setup(self, lit_api: LitAPI) -> None:
        custom_path = getattr(lit_api, "_api_path", _DEFAULT_LIT_API_PATH)
        if custom_path not in (_DEFAULT_LIT_API_PATH, self.default_api_path):
            warnings.warn(
                f"Custom API path detected: {type(self).__name__} is served at {custom_path!r}; OpenAI clients "
                f"call {self.default_api_path!r}, so they need a base URL that maps to it.",
                stacklevel=3,
            )
            self.api_path = custom_path
        registered = set(self._registered)
        self._endpoints = [e for e in self._endpoints if (e.path, e.endpoint.__name__) not in registered]
        self._registered = []
        for path, endpoint, methods in self.routes():
            self.add_endpoint(path, endpoint, methods)
            self._registered.append((path, endpoint.__name__))

    def routes(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        """(path, handler, methods) of this spec's routes."""
        raise NotImplementedError

    # ------------------------------------------------------- front helpers
    def error_response(self, error: ServerError) -> Response:
        """How the core answers a ``ServerError`` raised on this spec's routes (auth, for one)."""
        return OpenAIError.from_server_error(error).response()

    async def call_worker(self, request_object: Any, http_request: Request) -> bytes:
        try:
            return await self.front.call(request_object, http_request)
        except ServerError as error:
            raise OpenAIError.from_server_error(error) from None


async def read_json_body(http_request: Request, model: type[ModelT]) -> ModelT:
    """Parse and validate the request body; every failure is a 400 naming what is wrong."""
    return parse_body(await http_request.body(), model)
