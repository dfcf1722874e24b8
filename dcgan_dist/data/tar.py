"""Tar members as (name, bytes), read straight from the 512-byte headers, and grouped into
WebDataset samples by key.

Python's `tarfile` (which WebDataset's reader uses) costs tens of microseconds per member, more
than decoding a 64 px JPEG, and our packer's tars carry a pax header per member (tarfile writes
float mtimes that way). This reads what a shard holds: ustar and GNU headers, pax `path`/`size`
records, GNU long names; directories, links and other special members are passed over. A
stream that ends inside a member, a header without the ustar magic or whose size field is not a
number raises TarError (the reader counts the shard as truncated). Header checksums are not
summed (that costs as much as the rest of the parsing); a shard's sha256 is `shards inspect`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

BLOCK = 512
FILE_TYPES = (b"0", b"\0", b"7")  # regular files (7: contiguous)


class TarError(ValueError):
    """The stream is not a readable tar (truncated, or a broken header)."""


class Blocks:
    """A tar stream read in chunks of `CHUNK` bytes: a member costs slices of a buffer, not
    read() calls (four per member otherwise: header, pax record, header, data)."""

    CHUNK = 1 << 20
    CHUNK_AMONG_LARGE = 1 << 16  # after a large member: its neighbours' headers, not most of the next one

    def __init__(self, fileobj):
        self.fileobj, self.buffer, self.at, self.chunk = fileobj, b"", 0, self.CHUNK

    def take(self, size: int, allow_short: bool = False) -> bytes:
        end = self.at + size
        if end <= len(self.buffer):
            data, self.at = self.buffer[self.at:end], end
            return data
        rest = memoryview(self.buffer)[self.at:]
        if size - len(rest) > self.CHUNK // 8:  # a large member (a raw group): read straight into its own buffer
            data, self.buffer, self.at = self.read_into(rest, size), b"", 0
            # A 1 MiB chunk read next would hold most of the following large member, copied twice more.
            self.chunk = self.CHUNK_AMONG_LARGE
        else:
            self.buffer = rest.tobytes() + self.read(max(self.chunk, size - len(rest)))
            data = self.buffer[:size]
            self.at = len(data)
        if len(data) < size and not allow_short:
            raise TarError(f"the tar stream ends {size - len(data)} bytes short of a member")
        return data

    def read_into(self, start: bytes | memoryview, size: int) -> bytearray:
        """`start` and then what follows in the stream, `size` bytes in all (fewer at its end), in
        one writable buffer: readers may wrap it in a tensor without copying it again."""
        data = bytearray(size)
        data[:len(start)] = start
        view, have = memoryview(data), len(start)
        while have < size and (got := self.fileobj.readinto(view[have:])):
            have += got
        view.release()
        del data[have:]
        return data

    def read(self, size: int) -> bytes:
        """Up to `size` bytes, fewer only at the end of the stream (a network stream may return less)."""
        pieces, have = [], 0
        while have < size and (more := self.fileobj.read(size - have)):
            pieces.append(more)
            have += len(more)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def header_number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise TarError(f"a tar header holds {field!r} where a number belongs") from None


def pax_records(data: bytes) -> dict[str, str]:
    """`LEN key=value\\n` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\0":
        length = int(data[position:data.index(b" ", position)])
        key, _, value = data[data.index(b" ", position) + 1:position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def tar_members(fileobj) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in the tar stream, in order."""
    return walk(Blocks(fileobj))


def walk(blocks, skip_bodies: bool = False) -> Iterator[tuple[str, bytes | int]]:
    """(name, data) of every regular file read through `blocks` (a Blocks, or anything with its
    take(size, allow_short) and skip(size)); with `skip_bodies`, (name, size): the files' bytes
    are passed over with skip() (`shards index` reads headers only)."""
    pax: dict[str, str] = {}
    long_name = None
    while True:
        header = blocks.take(BLOCK, allow_short=True)
        if len(header) < BLOCK or header.count(0) == BLOCK:  # the end (two zero blocks), or a stream cut at a block
            if header and header.count(0) != len(header):
                raise TarError("the tar stream ends inside a header")
            return
        if header[257:262] != b"ustar":  # cheaper than the checksum (4 us, as much as the rest), and catches a misread
            raise TarError("a tar header without the ustar magic: not a tar, or misaligned")
        kind, size = header[156:157], header_number(header[124:136])
        size = int(pax.get("size", size))
        if skip_bodies and kind not in (b"x", b"g", b"L"):
            blocks.skip(-(-size // BLOCK) * BLOCK)
            data = size
        else:
            data = blocks.take(-(-size // BLOCK) * BLOCK)
            if len(data) > size:
                if isinstance(data, bytearray):
                    del data[size:]  # in place: no copy of a large member
                else:
                    data = data[:size]
        if kind in (b"x", b"g"):  # pax: this (x) or every (g, ignored) following member's fields
            if kind == b"x" and (b"path=" in data or b"size=" in data):  # others (mtime, ...) change nothing here
                pax = pax_records(data)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix for long paths
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}" if prefix else name
        pax, long_name = {}, None
        if kind in FILE_TYPES:
            yield name, data


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's key and suffix of a member name: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no suffix, or a name starting with a dot
        return None
    return name[:dot], name[dot + 1:].lower()


def samples(fileobj, url: str) -> Iterator[dict]:
    """Consecutive members of one key as a sample {"__key__", "__url__", suffix: bytes, ...}, as
    WebDataset's group_by_keys makes them (metadata members such as `__x__` are passed over)."""
    return grouped(tar_members(fileobj), url)


def grouped(members: Iterator[tuple[str, bytes | int]], url: str) -> Iterator[dict]:
    """samples() of (name, data) members: the one rule of keys, for the reader and for `shards index`."""
    sample = None
    for name, data in members:
        parts = split_key(name)
        if parts is None or "__" in name and name.rsplit("/", 1)[-1].startswith("__"):
            continue
        key, suffix = parts
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise TarError(f"{name}: a second {suffix!r} member for key {key}")
        sample[suffix] = data
    if sample is not None:
        yield sample
