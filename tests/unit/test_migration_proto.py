"""migrate_pb2.py is what protoc makes of migrate.proto, and the messages encode as LXD's do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lxd_daemon.migration import migrate_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_generated_module_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'lxd_daemon/migration'}",
                    f"--python_out={tmp_path}", str(ROOT / "lxd_daemon/migration/migrate.proto")], check=True)
    assert (tmp_path / "migrate_pb2.py").read_text() == (ROOT / "lxd_daemon/migration/migrate_pb2.py").read_text()


def test_header_wire_bytes():
    h = pb.MigrationHeader(fs=pb.RSYNC, rsyncFeatures=pb.rsyncFeatures(xattrs=True, delete=True, compress=True),
                           indexHeaderVersion=1)
    # field 1 varint 0; field 8 (message: 1,2,3 true); field 13 varint 1
    assert h.SerializeToString() == bytes.fromhex("0800" "4206" "080110011801" "6801")
    back = pb.MigrationHeader.FromString(h.SerializeToString())
    assert back.rsyncFeatures.delete and back.indexHeaderVersion == 1
    ctl = pb.MigrationControl(success=False, message="no pool")
    assert pb.MigrationControl.FromString(ctl.SerializeToString()).message == "no pool"
