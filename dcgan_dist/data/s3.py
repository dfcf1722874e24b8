"""Object storage through boto3: one client per process, URL helpers, and the opener that
lets WebDataset read `s3://` shards (registered in `webdataset.gopen.gopen_schemes`, so no
`curl`/`aws` subprocess is involved).

Credentials and the endpoint come from boto3's usual chain: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`), `AWS_PROFILE`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, config
files, instance roles; when none are found the error says so and lists where boto3 looked
(credential_places()), not that the endpoint is unreachable. Local paths go through the same
helpers, so the packer and the reader treat both alike.

Faults (docs/data.md#faults): botocore's `standard` retry mode, with bounded timeouts, retries
throttling (503 SlowDown), 5xx answers, refused or reset connections and a stall before the
answer. A body cut or stalled mid-read is not botocore's to retry: the reader here asks again
for the rest (a Range GET pinned to the object's ETag), a bounded number of times. Every retry
is counted (retry_count()), so the reader can report them. An object replaced between two GETs
of one read raises ObjectChanged: two versions are never spliced.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError, ProfileNotFound

from dcgan_dist.util import redact

# Forwarded from the driver to Ray workers (in memory, never logged) so workers see the same
# endpoint and credentials as the preflight did.
AWS_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)
# botocore's "max_attempts" counts retries, not attempts. Training reads: patient (8 retries,
# backoff up to 20 s each: minutes of outage survived). Preflight: 3 retries, which ride out a
# burst of throttling or a cut connection and still fail within seconds (backoff <= 1 + 2 + 4 s)
# on an endpoint that is down.
PATIENT = BotoConfig(retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10, read_timeout=60)
FAST_RETRIES = 3
FAST = BotoConfig(retries={"mode": "standard", "max_attempts": FAST_RETRIES}, connect_timeout=2, read_timeout=5)
# A body cut mid-read: ask again for the rest this many times per opened object (per resume,
# botocore's own retries apply to the new GET as well).
BODY_RESUMES = 5
# Multipart above 64 MiB, in 64 MiB parts.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)

READ_BUFFER = 1 << 20

_clients: dict[tuple[int, bool], object] = {}
_retries = [0]  # this process's S3 retries (botocore's and the body resumes here), see retry_count()
_retries_lock = threading.Lock()


class StorageError(OSError):
    """A URL that cannot be read or written; the message names the URL and the reason."""


class ObjectChanged(StorageError):
    """The object was replaced while it was being read (its ETag changed): reading on would
    splice two versions, and reading it again from the start gives the other one."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split(url: str) -> tuple[str, str]:
    """s3://bucket/key/parts -> ("bucket", "key/parts")."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket in the URL")
    return bucket, key


def join(base: str, name: str) -> str:
    """`name` relative to the folder/prefix `base` (absolute names and URLs pass through)."""
    if "://" in name or name.startswith("/"):
        return name
    return base.rstrip("/") + "/" + name if is_s3(base) else str(Path(base) / name)


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_s3(url) else str(Path(url).parent)


def client(fast: bool = False):
    """This process's S3 client (boto3 clients must not cross a fork, hence the pid key)."""
    key = (os.getpid(), fast)
    if key not in _clients:
        s3_client = boto3.session.Session().client("s3", config=FAST if fast else PATIENT)
        s3_client.meta.events.register("request-created.s3", _count_botocore_retry)
        _clients[key] = s3_client
    return _clients[key]


def _count_botocore_retry(request, **kwargs) -> None:
    # botocore builds a new request for each attempt and numbers it in the request's context
    if request.context.get("retries", {}).get("attempt", 1) > 1:
        count_retry()


def count_retry() -> None:
    with _retries_lock:
        _retries[0] += 1


def retry_count() -> int:
    """S3 requests this process has retried so far (throttled, failed, cut or stalled ones)."""
    return _retries[0]


def endpoint() -> str:
    return client(fast=True).meta.endpoint_url


def describe(url: str, error: Exception) -> StorageError:
    """An S3/botocore error as one line naming the URL and what went wrong."""
    url = redact(url)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)):  # before any request: not the endpoint's
        found = "no S3 credentials found" if isinstance(error, NoCredentialsError) else f"S3 credentials: {error}"
        return StorageError(f"{url}: {found}; boto3 looks in {credential_places()}")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{url}: not found")
        if code == "NoSuchBucket":
            return StorageError(f"{url}: no such bucket")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            return StorageError(f"{url}: access denied ({code})")
        if code in ("PreconditionFailed", "412"):  # the IfMatch of a pinned GET
            return ObjectChanged(f"{url}: the object was replaced while it was being read (its ETag changed)")
        if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded") or (status or 0) >= 500:
            retries = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            return StorageError(f"{url}: endpoint {redact(endpoint())} failing: {code or 'HTTP'} {status}, still after {retries} "
                                "retries; check the object store's health and load, then run again")
        return StorageError(f"{url}: S3 error {code or status}")
    if isinstance(error, BotoCoreError):
        return StorageError(f"{url}: endpoint {redact(endpoint())} unreachable or failing ({type(error).__name__}: {error}); "
                            "check AWS_ENDPOINT_URL and that the object store is up")
    return StorageError(f"{url}: {error}")


def credential_places() -> str:
    """Where boto3's default chain looks for credentials, in its order, with this process's files."""
    profile = os.environ.get("AWS_PROFILE", "default")
    credentials_file = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    config_file = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    return (f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile {profile!r} (AWS_PROFILE) in {credentials_file} "
            f"(AWS_SHARED_CREDENTIALS_FILE) and {config_file} (AWS_CONFIG_FILE), AWS_WEB_IDENTITY_TOKEN_FILE, "
            "container credentials, the EC2 instance metadata service")


class _RawBody(io.RawIOBase):
    """An S3 object's body as a raw stream, so io.BufferedReader can put a large buffer in front
    of it (tarfile reads in 10 KiB records; each would otherwise be one socket read). A body cut
    or stalled mid-read is resumed where it stopped (a Range GET pinned to the ETag, so a
    replaced object is ObjectChanged, never a splice), at most BODY_RESUMES times; then
    StorageError. `etag`: pin the first GET too (an object opened again must be the same)."""

    def __init__(self, url: str, fast: bool, etag: str | None = None):
        self.url, self.fast = url, fast
        self.bucket, self.key = split(url)
        self.position, self.resumes = 0, 0
        self.body, self.etag = None, etag
        self._get()

    def _get(self) -> None:
        extra = {"IfMatch": self.etag} if self.etag else {}
        if self.position:
            extra["Range"] = f"bytes={self.position}-"
        try:
            response = client(self.fast).get_object(Bucket=self.bucket, Key=self.key, **extra)
        except (ClientError, BotoCoreError) as e:
            raise describe(self.url, e) from None
        self.body, self.etag = response["Body"], response.get("ETag")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                data = self.body.read(len(buffer))
                break
            except (BotoCoreError, OSError) as e:  # cut (IncompleteRead, reset) or stalled (read timeout)
                if self.resumes >= BODY_RESUMES or self.etag is None:
                    raise describe(self.url, e) from None
                self.body.close()
                time.sleep(min(0.2 * 2**self.resumes, 5.0))
                self.resumes += 1
                count_retry()
                self._get()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def open_read(url: str, fast: bool = False, etag: str | None = None):
    """A binary file-like object for a local path or an s3:// URL (streamed, not downloaded).
    `etag` (S3): read that version or raise ObjectChanged; etag_of() gives the version read."""
    if not is_s3(url):
        try:
            return open(url, "rb")
        except OSError as e:
            raise StorageError(f"{url}: {e.strerror or e}") from None
    return io.BufferedReader(_RawBody(url, fast, etag), buffer_size=READ_BUFFER)


def etag_of(stream) -> str | None:
    """The ETag of the object an open_read() stream reads (None for a local file)."""
    body = getattr(stream, "raw", None)
    return body.etag if isinstance(body, _RawBody) else None


def read_bytes(url: str, fast: bool = False) -> bytes:
    stream = open_read(url, fast)
    try:
        return stream.read()
    except StorageError:
        raise
    except (BotoCoreError, OSError) as e:
        raise describe(url, e) from None
    finally:
        stream.close()


def exists(url: str, fast: bool = False) -> bool:
    """True if the object/file is there; other failures (access, endpoint) raise StorageError."""
    if not is_s3(url):
        return Path(url).is_file()
    bucket, key = split(url)
    try:
        client(fast).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise describe(url, e) from None
    except BotoCoreError as e:
        raise describe(url, e) from None


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object/file; local files appear atomically (tmp + rename)."""
    if not is_s3(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    bucket, key = split(url)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data)
    except (ClientError, BotoCoreError) as e:
        raise describe(url, e) from None


def check_writable(url: str) -> None:
    """Write and delete a marker object under the s3:// prefix `url` (fast client): raises
    StorageError naming the URL for a missing bucket, denied access or an unreachable endpoint."""
    bucket, key = split(url)
    marker = (key.rstrip("/") + "/" if key else "") + f".dcgan-preflight-{os.getpid()}"
    try:
        client(fast=True).put_object(Bucket=bucket, Key=marker, Body=b"")
        client(fast=True).delete_object(Bucket=bucket, Key=marker)
    except (ClientError, BotoCoreError) as e:
        raise describe(url, e) from None


def upload_file(path: Path, url: str) -> None:
    """Move a finished local file to `url`: a rename locally, a (multipart) upload to S3."""
    if not is_s3(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        Path(path).replace(url)
        return
    bucket, key = split(url)
    try:
        client().upload_file(str(path), bucket, key, Config=TRANSFER)
    except (ClientError, BotoCoreError) as e:
        raise describe(url, e) from None
    except boto3.exceptions.S3UploadFailedError as e:
        raise StorageError(f"{redact(url)}: upload failed ({e})") from None


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset's opener for s3:// URLs (see register())."""
    if mode[0] != "r":
        raise StorageError(f"{url}: only reading is supported by the s3 opener")
    return open_read(url)


def register() -> None:
    """Make `webdataset.gopen` (and so wds.WebDataset("s3://...")) open s3:// through boto3."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = gopen_s3
