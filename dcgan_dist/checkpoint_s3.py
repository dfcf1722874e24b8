"""The pyarrow S3 filesystem Ray Train writes checkpoints with, whole after pickling.

`RunConfig(storage_filesystem=...)` reaches Ray Train's controller and workers pickled, and
pyarrow's `S3FileSystem.__reduce__` (checked in pyarrow 25.0.1) rebuilds the filesystem from
the options its C++ side reports: explicit credentials, region, scheme, endpoint, connect and
request timeouts, role, proxy, background writes, bucket and directory options, default
metadata, virtual addressing, CA file. It leaves out one: the retry strategy, which C++ holds as
an opaque object, so every copy went back to 3 attempts and a few 503 SlowDown answers in a row
ended a checkpoint write in the controller. This subclass keeps the strategy it was built with
and hands it to its copies.
"""

from __future__ import annotations

import functools

from pyarrow import fs


class RetryingS3FileSystem(fs.S3FileSystem):
    """A pyarrow S3FileSystem (Ray Train and pyarrow take it as one) whose copies, pickled or
    not, retry as it does."""

    def __init__(self, *, retry_strategy: fs.S3RetryStrategy, **options):
        super().__init__(retry_strategy=retry_strategy, **options)
        self.retry_strategy = retry_strategy

    def __reduce__(self):
        _, (options,) = super().__reduce__()
        return functools.partial(RetryingS3FileSystem, retry_strategy=self.retry_strategy, **options), ()
