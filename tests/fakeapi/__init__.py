"""A fake Kubernetes API server for tests (see ``server``); the product never ships it."""

from tests.fakeapi.server import FakeApiServer
from tests.fakeapi.store import ApiError, Resource

__all__ = ["ApiError", "FakeApiServer", "Resource"]
