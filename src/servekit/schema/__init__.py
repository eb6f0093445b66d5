"""Ready-made pydantic request and response types (``ls.schema.image``)."""
