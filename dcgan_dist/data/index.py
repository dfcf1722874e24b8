"""`shards index`: a manifest for WebDataset shards written elsewhere (img2dataset,
`webdataset.ShardWriter`, the public ImageNet sets), read from their tar headers only.

The shards are named by brace patterns (`train-{000000..001023}.tar`, expanded as webdataset
does, by the braceexpand package), lists of URLs (files of one URL or pattern a line), folders or
s3:// prefixes (every `.tar` under them), on disk or in S3. Each shard is read by ranges (range
GETs on S3, seeks on disk): a header, then the next one past the member's bytes. A range runs
on after the header, HEADER_WINDOW bytes at first, doubling while the next header lies within
READ_THROUGH of its end (small members: the shard read whole in a few large requests, cheaper
than a round trip per header) and back to HEADER_WINDOW after a jump over a larger member (its
bytes never fetched). Members are grouped
into samples by WebDataset's rule (tar.grouped: the key is the path up to the first dot of the
file name), and the samples holding one of `image_keys` are counted: the reader passes over the
others in the same way, so the manifest's counts are what training reads.

A shard that cannot be read (missing, not a tar, cut short) is left out of the manifest, listed
in its `report` and counted; credentials, an unreachable endpoint or a missing bucket stop the
whole index. `<manifest>.index-state.json` records each shard indexed; running the same command
again indexes only the rest (and the unreadable ones again).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from braceexpand import UnbalancedBracesError, braceexpand
from tqdm import tqdm

from dcgan_dist.data import manifest, s3, tar
from dcgan_dist.util import redact

HEADER_WINDOW = 64 << 10  # bytes a range fetches after a jump: a header and its small neighbours
MAX_WINDOW = 8 << 20  # the most one range fetches, doubling while the headers follow each other
# A gap up to this size between a range and the next header is read, not jumped: on S3 a GET's
# round trip (tens of ms) costs about as much time as this many bytes at one connection's rate.
READ_THROUGH = 256 << 10
STATE_SUFFIX = ".index-state.json"
STATE_EVERY_S = 2.0  # the state is rewritten at most this often (and at the end)
SOURCE = "webdataset"


class ShardMissing(s3.StorageError):
    """A listed shard that is not there: one unreadable shard, not a reason to stop."""


class RangedReader:
    """A shard's bytes by ranges, for tar.walk(skip_bodies=True): take() reads, skip() jumps.
    Counts the bytes fetched and the requests made."""

    def __init__(self, url: str):
        self.url, self.position, self.buffer, self.buffer_start = url, 0, b"", 0
        self.window, self.size, self.bytes_read, self.requests = HEADER_WINDOW, None, 0, 0
        self.file = None
        if not s3.is_s3(url):
            try:
                self.file = open(url, "rb")
            except FileNotFoundError:
                raise ShardMissing(f"{url}: not found") from None
            self.size = os.fstat(self.file.fileno()).st_size

    def fetch(self, start: int, length: int) -> bytes:
        if self.size is not None and start >= self.size:
            return b""
        self.requests += 1
        if self.file is not None:
            self.file.seek(start)
            data = self.file.read(length)
        else:
            data = self.get(start, length)
        self.bytes_read += len(data)
        return data

    def get(self, start: int, length: int) -> bytes:
        bucket, key = s3.split(self.url)
        try:
            response = s3.client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            data = response["Body"].read()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ShardMissing(f"{redact(self.url)}: not found") from None
            if code == "InvalidRange":  # an empty object
                self.size = 0
                return b""
            raise s3.describe(self.url, e) from None
        except BotoCoreError as e:
            raise s3.describe(self.url, e) from None
        self.size = int(response.get("ContentRange", "/0").rsplit("/", 1)[1])
        return data

    def take(self, size: int, allow_short: bool = False) -> bytes:
        end, buffer_end = self.position + size, self.buffer_start + len(self.buffer)
        if end > buffer_end:
            gap = self.position - buffer_end
            if gap <= READ_THROUGH:  # runs on from the last range (through a small gap): keep its tail, fetch more
                self.window = min(self.window * 2, MAX_WINDOW)
                fetched = self.fetch(buffer_end, max(self.window, end - buffer_end))
                self.buffer = self.buffer[self.position - self.buffer_start:] + fetched if gap <= 0 else fetched[gap:]
            else:  # a jump over members' bytes
                self.window = HEADER_WINDOW
                self.buffer = self.fetch(self.position, max(self.window, size))
            self.buffer_start = self.position
        data = self.buffer[self.position - self.buffer_start:end - self.buffer_start]
        self.position += len(data)
        if len(data) < size and not allow_short:
            raise tar.TarError(f"the tar stream ends {size - len(data)} bytes short of a member")
        return data

    def skip(self, size: int) -> None:
        self.position += size  # a header was read before: the size is known
        if self.size is not None and self.position > self.size:
            raise tar.TarError(f"the tar stream ends {self.position - self.size} bytes short of a member")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def index_shard(url: str, image_keys: tuple[str, ...]) -> dict:
    """A shard's manifest record from its headers: {"url", "num_samples" (samples with an image),
    "bytes", "samples_without_image", "bytes_read", "requests"}."""
    reader = RangedReader(url)
    samples = with_image = 0
    try:
        for sample in tar.grouped(tar.walk(reader, skip_bodies=True), url):
            samples += 1
            with_image += any(key in sample for key in image_keys)
    finally:
        reader.close()
    return {"url": url, "num_samples": with_image, "bytes": reader.size or 0, "samples_without_image": samples - with_image,
            "bytes_read": reader.bytes_read, "requests": reader.requests}


def expand(sources: list[str]) -> list[str]:
    """Every shard URL the arguments name, in their order, each once (see expand_one)."""
    urls = [url for source in sources for url in expand_one(source)]
    return list(dict.fromkeys(urls))


def expand_one(source: str, listed: bool = False) -> list[str]:
    """A brace pattern's shards (`.tar` URLs), a folder's or s3:// prefix's `.tar` shards (a name
    ending in /, or a local folder), or else a file listing URLs or patterns, one a line."""
    if not source.strip():
        raise ValueError("an empty shard pattern")
    try:
        names = list(braceexpand(source.strip()))
    except UnbalancedBracesError:
        raise ValueError(f"{redact(source)}: unbalanced braces in the shard pattern") from None
    if any("{" in name or "}" in name for name in names):
        raise ValueError(f"{redact(source)}: a malformed brace pattern (a range is written {{000000..001023}}, a choice {{a,b}})")
    urls = []
    for name in names:
        if not s3.is_s3(name):
            name = str(Path(name).expanduser().resolve()) + ("/" if name.endswith("/") else "")
        if name.endswith(".tar"):
            urls.append(name)
        elif name.endswith("/") or (not s3.is_s3(name) and Path(name).is_dir()):
            urls += list_shards(name)
        elif listed:
            raise ValueError(f"{redact(name)}: not a .tar shard (a list of URLs names shards, patterns or folders)")
        else:
            urls += read_list(name)
    return urls


def list_shards(prefix: str) -> list[str]:
    """The `.tar` files in a folder, or objects under an s3:// prefix, sorted."""
    if not s3.is_s3(prefix):
        found = sorted(str(path) for path in Path(prefix).glob("*.tar"))
    else:
        bucket, key = s3.split(prefix)
        try:
            pages = s3.client(fast=True).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            found = sorted(f"s3://{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", ())
                           if item["Key"].endswith(".tar"))
        except (ClientError, BotoCoreError) as e:
            raise s3.describe(prefix, e) from None
    if not found:
        raise ValueError(f"{redact(prefix)}: no .tar shards there")
    return found


def read_list(url: str) -> list[str]:
    """The shards a list file names (relative names are relative to the list's folder)."""
    lines = s3.read_bytes(url, fast=True).decode("utf-8", "replace").splitlines()
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"{redact(url)}: an empty list of shard URLs")
    return [shard for name in names for shard in expand_one(relative_to(url, name), listed=True)]


def relative_to(list_url: str, name: str) -> str:
    """A name in a list file, relative to the list's folder or prefix (`..` resolved in S3 keys too)."""
    joined = s3.join(s3.parent(list_url), name)
    if not s3.is_s3(joined):
        return joined
    bucket, key = s3.split(joined)
    return f"s3://{bucket}/{posixpath.normpath(key)}"


def state_url(out: str) -> str:
    return out.removesuffix(".json") + STATE_SUFFIX


def read_state(out: str, image_keys: tuple[str, ...]) -> dict[str, dict]:
    """The shards an earlier run of the same index recorded."""
    url = state_url(out)
    if not s3.exists(url):
        return {}
    state = json.loads(s3.read_bytes(url))
    if tuple(state["image_keys"]) != image_keys:
        raise ValueError(f"{redact(url)}: an index with --image-key {','.join(state['image_keys'])} is under way there; "
                         "use another --out or delete it")
    return state["shards"]


def index(sources: list[str], out: str, image_keys: tuple[str, ...] = manifest.INDEXABLE_KEYS, workers: int = 8,
          progress: bool = True) -> dict:
    """Index the shards `sources` name into the manifest `out`; returns its report with
    "manifest", "shards", "samples" and "indexed_now" added."""
    from dcgan_dist.data.pack import TOOL_VERSION

    if not out.endswith(".json"):
        raise ValueError(f"--out {redact(out)}: the manifest's path must end in .json")
    if not set(image_keys) <= set(manifest.INDEXABLE_KEYS) or not image_keys:
        raise ValueError(f"--image-key takes some of {','.join(manifest.INDEXABLE_KEYS)} (got {','.join(image_keys)})")
    out = out if s3.is_s3(out) else str(Path(out).expanduser().resolve())
    urls = expand(sources)
    done = read_state(out, image_keys)
    todo = [url for url in urls if url not in done]
    unreadable = index_all(todo, image_keys, workers, progress, done, out, len(urls))
    if len(unreadable) == len(urls):
        raise ValueError(f"no shard could be read: {len(urls)} of {len(urls)} failed (first: {unreadable[0]['url']}: "
                         f"{unreadable[0]['error']})")
    records = [done[url] for url in urls if url in done]
    shards = [{"url": record["url"], "num_samples": record["num_samples"], "bytes": record["bytes"]} for record in records]
    report = {"shards_listed": len(urls), "unreadable_shards": unreadable,
              "samples_without_image": sum(record["samples_without_image"] for record in records),
              "bytes": sum(record["bytes"] for record in records), "bytes_read": sum(record["bytes_read"] for record in records),
              "requests": sum(record["requests"] for record in records)}
    found = manifest.Manifest(out, SOURCE, 0, manifest.ORIGINAL, shards, image_keys, original_size=True)
    manifest.write(out, found, TOOL_VERSION, report)
    return {**report, "manifest": out, "shards": len(shards), "samples": found.num_samples, "indexed_now": len(todo)}


def index_all(todo: list[str], image_keys: tuple[str, ...], workers: int, progress: bool, done: dict[str, dict], out: str,
              total: int) -> list[dict]:
    """Index `todo` on `workers` threads into `done`, the state rewritten as they finish; the unreadable shards."""
    unreadable, written = [], time.monotonic()

    def attempt(url: str) -> dict:
        try:
            return index_shard(url, image_keys)
        except (ShardMissing, tar.TarError, OSError, ValueError) as e:
            if isinstance(e, s3.StorageError) and not isinstance(e, ShardMissing):
                raise  # credentials, endpoint, bucket: every shard would fail the same way
            return {"url": url, "error": str(e) or type(e).__name__}

    bar = tqdm(total=total, initial=total - len(todo), unit="shard", disable=not progress, desc="index")
    pool = ThreadPoolExecutor(max(1, min(workers, len(todo) or 1)))
    try:
        for record in pool.map(attempt, todo):
            if "error" in record:
                unreadable.append(record)
            else:
                done[record["url"]] = record
            bar.update()
            if time.monotonic() - written > STATE_EVERY_S:
                write_state(out, image_keys, done)
                written = time.monotonic()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        write_state(out, image_keys, done)
    return unreadable


def write_state(out: str, image_keys: tuple[str, ...], done: dict[str, dict]) -> None:
    s3.write_bytes(state_url(out), json.dumps({"image_keys": list(image_keys), "shards": done}).encode())
