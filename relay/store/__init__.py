"""Redis I/O, split by concept: ``store`` (rows, sessions, the hot path),
``scripts`` (its Lua), ``fastlane`` (its own connection), ``sweep`` (the
housekeeping's queries), ``common`` (shared shapes and errors)."""

from relay.store.common import Forbidden, NotFound, OrphanedTask, Route, public_view
from relay.store.store import Store

__all__ = ["Forbidden", "NotFound", "OrphanedTask", "Route", "Store", "public_view"]
