"""Form bodies (multipart uploads, url-encoded fields) as picklable values for the workers."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from servekit.errors import ServerError


@dataclass
class UploadedFile:
    """An uploaded file as ``decode_request`` sees it: ``filename``, ``content_type``, ``file``, ``read()``."""

    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def file(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data


async def read_form(request: Request) -> dict[str, Any]:
    """The form's fields: strings, and ``UploadedFile`` for files; a repeated field becomes a list."""
    try:
        form = await request.form()
    except Exception as error:  # malformed multipart bodies raise several parser errors
        raise ServerError(400, f"Malformed form body: {error}") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        item: Any = value
        if isinstance(value, UploadFile):
            item = UploadedFile(value.filename, value.content_type, await value.read())
        if key in fields:
            existing = fields[key]
            fields[key] = [*existing, item] if isinstance(existing, list) else [existing, item]
        else:
            fields[key] = item
    await form.close()
    return fields
