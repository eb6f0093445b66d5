"""The simple ready-made APIs, where LitServe's tests import them from."""

from servekit.examples import SimpleBatchedAPI, SimpleLitAPI, SimpleStreamAPI, SimpleTorchAPI

__all__ = ["SimpleBatchedAPI", "SimpleLitAPI", "SimpleStreamAPI", "SimpleTorchAPI"]
