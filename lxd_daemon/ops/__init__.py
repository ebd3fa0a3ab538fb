from lxd_daemon.ops.manager import (
    CLASS_TASK,
    CLASS_TOKEN,
    CLASS_WEBSOCKET,
    Operation,
    OperationManager,
    Status,
)

__all__ = [
    "CLASS_TASK",
    "CLASS_TOKEN",
    "CLASS_WEBSOCKET",
    "Operation",
    "OperationManager",
    "Status",
]
