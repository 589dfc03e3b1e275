"""A real S3-compatible server on loopback, for tests and benchmarks (no cloud here).

:class:`LoopbackS3` runs moto's standalone server (the ``moto[server]`` extra)
in a thread of this process. Clients reach it over HTTP exactly as they reach
a cloud bucket, through pyarrow's S3 filesystem: nothing inside any process is
mocked. Its URIs carry the endpoint and test credentials, so a Ray worker on
any node of a :class:`vlmlab.testing.LocalCluster` opens them as they are.
The server keeps its objects in memory for as long as it runs: it outlives the
clusters a test starts and kills.
"""

from __future__ import annotations

import logging
from typing import Any, Self

from vlmlab.testing._loopback import LoopbackServer, free_port

ACCESS_KEY = "vlmlab-test"
SECRET_KEY = "vlmlab-test-secret"
REGION = "us-east-1"


class LoopbackS3(LoopbackServer):
    """moto's S3 server on ``127.0.0.1``; ``uri(bucket, prefix)`` names a place in it."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def uri(self, bucket: str, prefix: str = "") -> str:
        """``s3://`` URI of ``bucket/prefix`` with this server's endpoint and credentials."""
        path = f"{bucket}/{prefix.strip('/')}".rstrip("/")
        return (
            f"s3://{ACCESS_KEY}:{SECRET_KEY}@{path}"
            f"?endpoint_override={self.endpoint}&scheme=http&region={REGION}"
        )

    def create_bucket(self, bucket: str) -> str:
        """Create ``bucket``; returns its URI."""
        import pyarrow.fs as pafs

        filesystem = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint,
            scheme="http",
            region=REGION,
            allow_bucket_creation=True,
        )
        filesystem.create_dir(bucket)
        return self.uri(bucket)

    def open_uploads(self, bucket: str) -> int:
        """Multipart uploads started in ``bucket`` and neither completed nor aborted."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        return len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
