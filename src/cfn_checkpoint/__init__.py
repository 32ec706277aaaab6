"""cfn-checkpoint: exact, atomic checkpoints of multi-agent task state across Redis and SQL."""

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ErrorCode,
    LockTimeoutError,
    RestoreError,
    StoreUnavailableError,
    UnreadableFormatError,
    ValidationError,
)
from .layout import KeyLayout, validate_task_id
from .manager import CheckpointManager
from .model import (
    CheckpointConfig,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointTrigger,
    RecoveryResult,
    TtlPolicy,
)
from .runtime.embedded import EmbeddedRedis
from .runtime.writer import TaskWriter

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMetadata",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CheckpointTrigger",
    "CorruptCheckpointError",
    "EmbeddedRedis",
    "ErrorCode",
    "KeyLayout",
    "LockTimeoutError",
    "RecoveryResult",
    "RestoreError",
    "StoreUnavailableError",
    "TaskWriter",
    "TtlPolicy",
    "UnreadableFormatError",
    "ValidationError",
    "__version__",
    "validate_task_id",
]
