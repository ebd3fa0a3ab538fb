#!/bin/sh
# Regenerate lxd_daemon/migration/migrate_pb2.py from migrate.proto (protoc from grpcio-tools,
# installed with the test extras).
set -eu
cd "$(dirname "$0")/.."
.venv/bin/python -m grpc_tools.protoc -Ilxd_daemon/migration --python_out=lxd_daemon/migration \
    lxd_daemon/migration/migrate.proto
