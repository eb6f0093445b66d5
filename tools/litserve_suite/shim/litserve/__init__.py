"""Test shim: `import litserve` (and any `litserve.X`) resolves to servekit (and `servekit.X`)."""
import importlib
import importlib.abc
import importlib.util
import sys

import servekit as _servekit


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("litserve."):
            target_name = "servekit." + fullname[len("litserve."):]
            try:
                found = importlib.util.find_spec(target_name)
            except ModuleNotFoundError:
                found = None
            if found is None:
                return None
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module("servekit." + spec.name[len("litserve."):])
        module.__dict__.setdefault("__servekit_spec__", module.__spec__)
        return module

    def exec_module(self, module):
        # importlib stamped the alias spec on the real module: give it back its own.
        module.__spec__ = module.__dict__.get("__servekit_spec__", module.__spec__)


sys.meta_path.insert(0, _Alias())


def __getattr__(name):
    try:
        return getattr(_servekit, name)
    except AttributeError:
        return importlib.import_module("servekit." + name)


def __dir__():
    return dir(_servekit)
