"""Fixtures for the foreign-client tests: Python stubs generated from the public .proto alone,
and a real `sluice-agent` process on loopback.

Nothing here comes from the Rust crates: the stubs are compiled from
`proto/sluice/v1/sluice.proto` with grpcio-tools at test time, as any Python user would.
"""

import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import grpc
import pytest
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
AGENT_BIN = pathlib.Path(
    os.environ.get("SLUICE_AGENT_BIN", ROOT / "target" / "debug" / "sluice-agent")
)


@pytest.fixture(scope="session")
def pb():
    """The generated `sluice_pb2` and `sluice_pb2_grpc` modules, as one namespace."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="sluice-stubs-"))
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / "sluice" / "v1" / "sluice.proto"),
        ]
    )
    assert code == 0, "protoc failed on the public proto"
    sys.path.insert(0, str(out))
    messages = importlib.import_module("sluice.v1.sluice_pb2")
    services = importlib.import_module("sluice.v1.sluice_pb2_grpc")
    yield type("Stubs", (), {"m": messages, "s": services})
    sys.path.remove(str(out))
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def agent(tmp_path):
    """A single agent on loopback; yields its `host:port`. Killed at the end."""
    assert AGENT_BIN.exists(), f"{AGENT_BIN} is missing: cargo build -p sluice-agent"
    proc = subprocess.Popen(
        [
            str(AGENT_BIN),
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "data"),
            "--log-level",
            "warn",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("sluice-agent listening "), f"unexpected first line {line!r}"
    fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
    yield fields["grpc"]
    proc.kill()
    proc.wait()


@pytest.fixture
def channel(agent):
    with grpc.insecure_channel(agent) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
