"""The project's error types. Each renders as one line that names the file, URI or key."""

from __future__ import annotations


class AvsaError(Exception):
    """Base of every error avsa raises for bad input or an unreachable service."""


class _WhereError(AvsaError):
    def __init__(self, where: object, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")

    def __reduce__(self):
        # Rebuilt from (where, reason): errors cross process boundaries (Ray tasks and workers).
        return type(self), (self.where, self.reason)


class MediaError(_WhereError):
    """A media file that cannot be used: (path, reason)."""


class StorageError(_WhereError):
    """A URI that cannot be read or written: (uri, reason)."""


class ShardError(_WhereError):
    """A shard or manifest that is missing, corrupt or inconsistent: (uri, reason)."""


class ConfigError(_WhereError):
    """A config key with a bad value: (key, reason)."""


class TrackingError(_WhereError):
    """An MLflow tracking server that cannot be used: (uri, reason)."""


class CheckpointError(_WhereError):
    """A checkpoint that cannot be written or read: (uri, reason)."""


class LeaseError(_WhereError):
    """A directory another process writes to (its lease is held): (uri, reason)."""
