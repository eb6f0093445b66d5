"""Ready-made pydantic request and response types (``ls.schema.image``)."""

from servekit.schema import image

__all__ = ["image"]
