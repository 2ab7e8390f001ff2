"""A real S3 API on 127.0.0.1 for tests and benchmarks: moto's server in its own process.

Credentials and the endpoint are given the way a user gives them, through AWS_* environment
variables (child processes inherit them), so the code under test takes its normal path.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@contextmanager
def local_s3(access_key: str = "inpo-local-key", secret: str = "inpo-local-secret") -> Iterator[Callable[[], str]]:
    """Start the server, point the AWS_* environment at it, and yield a function that makes a
    fresh bucket and returns its name; restore the environment and stop the server on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {name: os.environ.get(name) for name in ENVIRONMENT}
    os.environ.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret,
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)") from None
                time.sleep(0.1)
        import s3fs

        counter = itertools.count()

        def new_bucket() -> str:
            name = f"inpo-{os.getpid()}-{next(counter)}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
            return name

        yield new_bucket
    finally:
        server.terminate()
        server.wait(timeout=30)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
