"""Create the S3 buckets named in $BUCKETS (space-separated) if they do not exist yet.

Run once against a fresh S3-compatible store (compose's `create-buckets`, the k8s Job in
infra/k8s/minio.yaml). It reads the same variables as the training code: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Retries while the store starts.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
import botocore.exceptions


def create_buckets(names: list[str], attempts: int = 30, wait_s: float = 2.0) -> list[str]:
    """Create the missing buckets; return the names it created."""
    s3 = boto3.client("s3")
    for attempt in range(attempts):
        try:
            existing = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
            break
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError):
            if attempt == attempts - 1:
                raise
            time.sleep(wait_s)
    created = [name for name in names if name not in existing]
    for name in created:
        s3.create_bucket(Bucket=name)  # us-east-1 (and MinIO) need no LocationConstraint
    return created


if __name__ == "__main__":
    names = os.environ.get("BUCKETS", "").split()
    if not names:
        sys.exit("create_buckets.py: set BUCKETS to the bucket names to create")
    created = create_buckets(names)
    print(f"created: {' '.join(created) or 'none'}; present: {' '.join(names)}")
