"""Checks of a LitAPI's hooks and settings made when it is built, with LitServe's errors and warnings."""

from __future__ import annotations

import inspect
import time
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servekit.api import LitAPI

# A constructor slower than this, in a class without its own ``setup``, is probably loading a model.
HEAVY_INIT_S = 1.0


def _defines_setup(cls: type) -> bool:
    """Whether a class below LitAPI defines ``setup`` (the base class's is a no-op)."""
    from servekit.api import LitAPI

    return getattr(cls, "setup", None) is not LitAPI.setup


class TimedInit(type):
    """Warns (``RuntimeWarning``, as LitServe does) when ``__init__`` is heavy and ``setup`` is missing:
    the constructor runs in the main process and the API is then copied into every worker."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        instance = super().__call__(*args, **kwargs)
        elapsed = time.perf_counter() - start
        if elapsed >= HEAVY_INIT_S and not _defines_setup(cls):
            warnings.warn(
                f"{cls.__name__}.__init__ took {elapsed:.2f} seconds. This suggests that you're loading a "
                "model or doing other heavy processing inside the constructor, which runs in the main "
                "process before the API is copied into every inference worker. Move one-time heavy "
                f"initialization into `{cls.__name__}.setup(self, device)`: it runs once in each worker, "
                "with that worker's device.",
                RuntimeWarning,
                stacklevel=2,
            )
        return instance


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


def check_async_hooks(api: LitAPI) -> None:
    """``enable_async=True`` needs an async ``predict`` (a coroutine or an async generator)."""
    if not _is_async(type(api).predict):
        raise ValueError(
            f"Async validation failed for {type(api).__name__}:\n"
            "- predict must be an async generator or async function when enable_async=True "
            "(define it with `async def`), or leave enable_async unset for a synchronous predict"
        )


def check_batch_hooks(api: LitAPI) -> str | None:
    """A warning when ``batch`` and ``unbatch`` are overridden but batching is off."""
    from servekit.api import LitAPI

    cls = type(api)
    if cls.batch is LitAPI.batch or cls.unbatch is LitAPI.unbatch or api.max_batch_size > 1:
        return None
    return (
        f"{cls.__name__} implements both batch and unbatch methods, but the max_batch_size parameter was "
        "not set: they are never called. Pass max_batch_size > 1 (e.g. "
        f"{cls.__name__}(max_batch_size=8, batch_timeout=0.01)) to batch requests."
    )


def check_loop(loop: Any) -> None:
    """servekit picks the worker loop itself; LitServe's custom ``LitLoop`` objects do not apply."""
    if loop is None or loop == "auto":
        return
    raise ValueError(
        f"loop must be 'auto', got {loop!r}: servekit chooses the inference loop from the API "
        "(single, batched, streaming, or async for an async predict); custom LitLoop objects are not supported"
    )
