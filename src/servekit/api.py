"""LitAPI: the user's hooks and their per-API settings."""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from servekit.api_checks import TimedInit, check_async_hooks, check_batch_hooks, check_loop
from servekit.json_values import jsonable

if TYPE_CHECKING:
    from servekit.mcp import MCP
    from servekit.specs.base import LitSpec

logger = logging.getLogger(__name__)


class LitAPI(metaclass=TimedInit):
    """Subclass and override ``setup``, ``decode_request``, ``predict`` and ``encode_response``.

    Settings may be passed here (``LitAPI(max_batch_size=8, stream=True, ...)``) or, as older
    LitServe code does, to ``LitServer``. Subclasses that define ``__init__`` without calling
    ``super().__init__()`` still work: every setting has a class-level default.
    """

    _max_batch_size: int = 1
    _batch_timeout: float = 0.0
    _api_path: str = "/predict"
    _stream: bool = False
    _spec: LitSpec | None = None
    _device: str | None = None
    _log_sink: Callable[[str, Any], None] | None = None
    _report_unhealthy: Callable[[str], None] | None = None
    request_timeout: float | None = None
    mcp: MCP | None = None
    _debug_errors: bool = False  # set by LitServer: 500 bodies show the exception
    enable_async: bool = False

    def __init__(
        self,
        max_batch_size: int = 1,
        batch_timeout: float = 0.0,
        api_path: str = "/predict",
        stream: bool = False,
        spec: LitSpec | None = None,
        loop: Any = "auto",
        enable_async: bool = False,
        mcp: MCP | None = None,
    ) -> None:
        self.mcp = mcp
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.api_path = api_path
        self.stream = stream
        if spec is not None:
            self.spec = spec
        check_loop(loop)
        self.enable_async = enable_async
        if enable_async:
            check_async_hooks(self)
        message = check_batch_hooks(self)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=3)

    # ---------------------------------------------------------------- settings
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"max_batch_size must be an integer of at least 1, got {value!r}")
        self._max_batch_size = value

    @property
    def batch_timeout(self) -> float:
        return self._batch_timeout

    @batch_timeout.setter
    def batch_timeout(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"batch_timeout must be non-negative, got {value!r}")
        self._batch_timeout = float(value)

    @property
    def api_path(self) -> str:
        if self._spec is not None and getattr(self._spec, "api_path", None):
            return str(self._spec.api_path)
        return self._api_path

    @api_path.setter
    def api_path(self, value: str) -> None:
        if not value.startswith("/"):
            raise ValueError(f"api_path must start with '/', like '/predict', got {value!r}")
        self._api_path = value

    @property
    def stream(self) -> bool:
        return self._stream

    @stream.setter
    def stream(self, value: bool) -> None:
        self._stream = bool(value)

    @property
    def spec(self) -> LitSpec | None:
        return self._spec

    @spec.setter
    def spec(self, value: LitSpec | None) -> None:
        self._spec = value
        if value is not None:
            self._stream = bool(getattr(value, "stream", self._stream))

    @property
    def device(self) -> str | None:
        return self._device

    @device.setter
    def device(self, value: str | None) -> None:
        self._device = value

    # ------------------------------------------------------------------- hooks
    def setup(self, device: str) -> None:
        """Load the model. Runs once in every inference worker, with that worker's device."""

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        # With a spec, the workers call the spec's hook directly, with the request's context.
        if self._spec is not None:
            return self._spec.decode_request(request, **kwargs)
        return request

    def batch(self, inputs: list[Any]) -> Any:
        spec_batch = getattr(self._spec, "batch", None)
        if spec_batch is not None:
            return spec_batch(inputs)
        first = inputs[0]
        if hasattr(first, "__torch_function__"):
            import torch

            return torch.stack(inputs)
        if type(first).__name__ == "ndarray":
            import numpy

            return numpy.stack(inputs)
        return inputs

    def predict(self, x: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("predict is not implemented: override LitAPI.predict")

    def unbatch(self, output: Any) -> Any:
        spec_unbatch = getattr(self._spec, "unbatch", None)
        if spec_unbatch is not None:
            return spec_unbatch(output)
        if self.stream:
            return self._unbatch_stream(output)
        return list(output)

    @staticmethod
    def _unbatch_stream(output_stream: Iterable[Any]) -> Iterator[list[Any]]:
        for output in output_stream:
            yield list(output)

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        if self._spec is not None:
            return self._spec.encode_response(output, **kwargs)
        return output

    def format_encoded_response(self, data: Any) -> Any:
        """How one item of a stream is framed for the client; override it for another framing (say,
        ``f"data: {json.dumps(data)}\\n\\n"``). Dicts and pydantic models become JSON lines; strings
        and bytes are sent as they are; anything else is sent as a JSON line too."""
        if isinstance(data, dict):
            return json.dumps(data, default=jsonable) + "\n"
        if hasattr(data, "model_dump_json") and callable(data.model_dump_json):
            return data.model_dump_json() + "\n"
        return data

    def health(self) -> bool:
        """Extra health check, called by ``/health`` in the HTTP front process."""
        return True

    def report_unhealthy(self, reason: str) -> None:
        """Tell the server that this worker can no longer serve (say, a background thread it relies
        on died). Callable from any thread of the worker: its in-flight requests fail at once with
        503, ``/health`` answers 503, and the worker process is replaced by a fresh one."""
        if self._report_unhealthy is None:
            raise RuntimeError("report_unhealthy() works only inside an inference worker")
        self._report_unhealthy(reason)

    # ----------------------------------------------------------------- logging
    def log(self, key: str, value: Any) -> None:
        """Send a (key, value) pair to the server's loggers."""
        if self._log_sink is None:
            logger.debug("LitAPI.log(%r, ...) called but no logger is attached", key)
            return
        self._log_sink(key, value)

    # ------------------------------------------------------------- validation
    def pre_setup(self, spec: LitSpec | None = None) -> None:
        """Get ready to be served (``LitServer`` calls it; LitServe's name): attach ``spec`` if given,
        let the spec adapt the API, then check the hooks against the settings."""
        if spec is not None:
            self.spec = spec
        if self._spec is not None:
            self._spec.pre_setup(self)
        self.validate()

    def validate(self) -> None:
        """Check the hooks against the settings before any worker starts."""
        predict = type(self).predict
        if (
            self.stream
            and self._spec is None
            and not (inspect.isgeneratorfunction(predict) or inspect.isasyncgenfunction(predict))
        ):
            raise ValueError(
                f"{type(self).__name__}: stream=True needs `predict` to be a generator (use `yield`)"
            )
        encode = type(self).encode_response
        if (
            self.stream
            and self._spec is None
            and not (inspect.isgeneratorfunction(encode) or inspect.isasyncgenfunction(encode))
            and not inspect.isasyncgenfunction(predict)
        ):
            raise ValueError(
                f"{type(self).__name__}: stream=True needs `encode_response` to be a generator that "
                "iterates over predict's output and yields encoded items"
            )
        if self.request_timeout not in (None, False, -1) and self.batch_timeout > float(self.request_timeout):
            raise ValueError("batch_timeout must be less than the server's timeout")
