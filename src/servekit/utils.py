"""LitServe's ``litserve.utils`` names that user code imports."""

from servekit.testing import wrap_litserve_start

__all__ = ["wrap_litserve_start"]
