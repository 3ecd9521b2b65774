"""A real S3 API for tests: moto's server on 127.0.0.1, and the AWS settings that reach it.

moto is a dev dependency (``moto[server]``). Without it a test skips, except under CI
(``CI=true``), where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import pytest

# moto accepts any key; these name no account anywhere
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
)


def require_moto():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("moto[server] is not installed (a dev dependency): pip install -e .[dev]")
        pytest.skip("moto[server] is not installed (a dev dependency)")
    return ThreadedMotoServer


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[dict[str, str]]:
    """Start moto on a free port of 127.0.0.1 with ``buckets``, put its settings into this
    process's environment (so Ray started afterwards passes them to its workers), yield them,
    then stop the server and restore the environment."""
    server_cls = require_moto()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_cls(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        # no lookups of an EC2 instance role (slow where there is no such service)
        "AWS_EC2_METADATA_DISABLED": "true",
        **FAKE_KEYS,
    }
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    for k in AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(settings)
    try:
        client = s3_client()
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield settings
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_client():
    """boto3's S3 client on the same settings: an independent reader of what the code wrote."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def keys(bucket: str, prefix: str) -> list[str]:
    client = s3_client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def get_bytes(bucket: str, key: str) -> bytes | None:
    client = s3_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
