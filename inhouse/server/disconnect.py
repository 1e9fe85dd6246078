"""ClientDisconnectedError: the client went away before its answer was complete.

Raised while the body is still uploading or while a blocking answer is generated; the error handlers turn
it into the one outcome every disconnect gets: 499 ``client_disconnected`` in the audit log, one short log
line, no traceback.  (A stream the client leaves ends the same way, recorded by the access middleware.)
"""

from __future__ import annotations

__all__ = ["ClientDisconnectedError"]


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready."""
