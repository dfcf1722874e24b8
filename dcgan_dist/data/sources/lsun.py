"""LSUN from its released lmdb export (e.g. bedroom_train_lmdb/): keys -> encoded WebP/JPEG.

Listing reads the keys only (about 3 M keys; the values, 43 GB for bedrooms, stay on disk), and
values are read one shard at a time: the packer opens the lmdb for a shard and closes it after,
so the pages of the memory map it touched leave the process (lmdb handles must not cross a fork
either, and each shard's are the process's own).

Why the listing walks the B-tree itself: py-lmdb's C extension touches every value's pages on
each cursor step, even for `iternext(keys=True, values=False)` (it "preloads" them), so listing
through a cursor reads the whole file from disk. `tree_keys` reads LMDB's on-disk format (the
meta pages, then branch and leaf pages, never an overflow page holding a value) with `os.pread`;
a database it does not recognise (another format version, duplicate keys) is listed through
the cursor instead.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
from PIL import Image

from dcgan_dist.data.sources import Load, Source

log = logging.getLogger(__name__)

# LMDB's on-disk format (mdb.c, format version 1, 64-bit): a page starts with a 16-byte header
# (pgno u64, pad u16, flags u16, lower u16, upper u16) and then u16 offsets of its nodes; a node is
# (lo u16, hi u16, flags u16, key size u16, key, ...), a branch node's child page is lo | hi << 16 | flags << 32.
PAGE_HEADER = struct.Struct("<QHHHH")
NODE_HEADER = struct.Struct("<HHHH")
META = struct.Struct("<II8xQ48s48sQQ")  # magic, version, (address), map size, free db, main db, last page, txn id
DB = struct.Struct("<IHHQQQQQ")  # pad (the free db's: page size), flags, depth, branch, leaf, overflow pages, entries, root
MAGIC, VERSION, DUPSORT, P_BRANCH, P_LEAF, P_LEAF2, NO_PAGE = 0xBEEFC0DE, 1, 0x04, 0x01, 0x02, 0x20, 2**64 - 1
SUB_DB_OR_DUPLICATES = 0x06  # leaf node flags F_SUBDATA | F_DUPDATA: not a plain key -> value


class UnknownLayout(ValueError):
    """An lmdb file this walker does not read; the cursor lists it instead."""


def _open(path: str) -> lmdb.Environment:
    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)


def _main_db(fd: int) -> tuple[int, int, int]:
    """(page size, root page, entries) of the main database, from the newer of the two meta pages."""
    first = os.pread(fd, PAGE_HEADER.size + META.size, 0)
    if len(first) < PAGE_HEADER.size + META.size:
        raise UnknownLayout("shorter than a meta page")
    page_size = DB.unpack(META.unpack_from(first, PAGE_HEADER.size)[3])[0]
    if page_size < 512 or page_size & (page_size - 1):
        raise UnknownLayout(f"page size {page_size}")
    metas = []
    for page in (0, 1):
        magic, version, _, _, main, _, txn_id = META.unpack(os.pread(fd, META.size, page * page_size + PAGE_HEADER.size))
        if magic == MAGIC and version == VERSION:
            metas.append((txn_id, DB.unpack(main)))
    if not metas:
        raise UnknownLayout("no meta page of format version 1")
    _, (_, flags, _, _, _, _, entries, root) = max(metas)
    if flags & DUPSORT:
        raise UnknownLayout("a database with duplicate keys")
    return page_size, root, entries


def tree_keys(path: str) -> list[bytes]:
    """The main database's keys in order, read from its branch and leaf pages only."""
    fd = os.open(Path(path) / "data.mdb", os.O_RDONLY)
    try:
        page_size, root, entries = _main_db(fd)
        keys: list[bytes] = []
        pending = [] if root == NO_PAGE else [root]  # a stack of pages, leftmost on top
        while pending:
            page = os.pread(fd, page_size, pending.pop() * page_size)
            _, _, flags, lower, _ = PAGE_HEADER.unpack_from(page)
            offsets = struct.unpack_from(f"<{(lower - PAGE_HEADER.size) // 2}H", page, PAGE_HEADER.size)
            nodes = [NODE_HEADER.unpack_from(page, offset) + (offset,) for offset in offsets]
            if flags & P_BRANCH:
                pending += [lo | hi << 16 | node_flags << 32 for lo, hi, node_flags, _, _ in reversed(nodes)]
            elif flags & P_LEAF and not flags & P_LEAF2:
                if any(node_flags & SUB_DB_OR_DUPLICATES for _, _, node_flags, _, _ in nodes):
                    raise UnknownLayout("sub-databases or duplicate keys")
                keys += [page[offset + NODE_HEADER.size:offset + NODE_HEADER.size + size] for _, _, _, size, offset in nodes]
            else:
                raise UnknownLayout(f"page flags {flags:#x}")
    finally:
        os.close(fd)
    if len(keys) != entries:
        raise UnknownLayout(f"{len(keys)} keys read, the meta page counts {entries}")
    return keys


def list_keys(path: str) -> list[bytes]:
    """Every key in the lmdb's order, without reading a value."""
    try:
        return tree_keys(path)
    except (UnknownLayout, struct.error) as e:
        log.warning("%s: listing through an lmdb cursor, which reads every value too (%s)", path, e)
    env = _open(path)
    try:
        with env.begin(write=False) as txn:
            return list(txn.cursor().iternext(keys=True, values=False))
    finally:
        env.close()


class _Reader:
    """Picklable: forked pack workers call it once per shard."""

    def __init__(self, path: str):
        self.path = path

    @contextmanager
    def __call__(self) -> Iterator[Load]:
        env = _open(self.path)
        try:
            with env.begin(write=False) as txn:
                yield lambda key: Image.open(io.BytesIO(txn.get(key)))  # get() copies the value out of the map
        finally:
            env.close()


def open_source(path: str | None) -> Source:
    if not path or not (Path(path) / "data.mdb").is_file():
        raise FileNotFoundError(f"--in {path}: not an lmdb folder (no data.mdb)")
    return Source("lsun", list_keys(path), _Reader(path))
