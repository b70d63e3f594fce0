"""A local S3-compatible server (moto's server mode) for the object-store tests and benchmarks.

:func:`start` runs ``python -m moto.server`` on a free local port in a child process and returns
its endpoint; :func:`s3_env` gives the ``AWS_*`` environment that points forvalue (and Lance,
Arrow and boto3) at it. moto comes with the ``test`` extra (``moto[server]``). moto keeps every
object in the server's memory: a stand-in for S3's API, not for its speed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a moto server; returns ``(process, endpoint)``; the caller terminates the process."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("moto server did not start in 60 s")


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    env = s3_env(endpoint)
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    ).create_bucket(Bucket=name)
