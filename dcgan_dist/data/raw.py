"""Grouped tar members, as pack.py writes them, each read as one group of N images without a
copy: the raw format's KEY.u8.npy (N x 3 x H x W uint8 pixels, a RawGroup, no image decoder) and
grouped JPEGs' KEY.jpgs (N JPEG files back to back) with KEY.sizes.npy (their lengths), a
JpegGroup; both beside KEY.keys.npy (their N keys, a unicode array). The arrays are .npy files
whose headers numpy's own parser reads (no pickle); a shard's groups share a few headers, so
each is parsed once. A group's per-sample work (tar headers, a sample dict, a place in the
reader's hold) is paid once for its N images."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator

import numpy as np
import torch

from dcgan_dist.data.decode import PIXELS
from dcgan_dist.data.manifest import JPEG_GROUP, JPEG_SIZES, RAW_KEYS, RAW_PIXELS


class Group:
    """The N images of one grouped tar member and their sample keys."""

    url: str
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def sample(self, at: int) -> dict:
        """Image `at` as a sample of its own ({"__key__", "__url__", and its image})."""
        raise NotImplementedError

    def images(self) -> Iterator[dict]:
        """One sample per image."""
        return (self.sample(at) for at in range(len(self)))


class RawGroup(Group):
    """The images of one raw tar member: `pixels`, N x 3 x H x W uint8 (a view of the member's
    bytes, no copy), and their N sample keys."""

    def __init__(self, url: str, keys: list[str], pixels: torch.Tensor):
        self.url, self.keys, self.pixels = url, keys, pixels

    def part(self, start: int, stop: int) -> RawGroup:
        return RawGroup(self.url, self.keys[start:stop], self.pixels[start:stop])

    def sample(self, at: int) -> dict:
        return {"__key__": self.keys[at], "__url__": self.url, PIXELS: self.pixels[at]}


class JpegGroup(Group):
    """The JPEGs of one grouped tar member, each a uint8 tensor as decode_jpeg takes it (views of
    the member's bytes, no copy, made in one call), and their N keys."""

    def __init__(self, url: str, keys: list[str], jpegs: list[torch.Tensor]):
        self.url, self.keys, self.jpegs = url, keys, jpegs

    def part(self, start: int, stop: int) -> JpegGroup:
        return JpegGroup(self.url, self.keys[start:stop], self.jpegs[start:stop])

    def sample(self, at: int) -> dict:
        return {"__key__": self.keys[at], "__url__": self.url, "jpg": self.jpegs[at].numpy().tobytes()}


def read_group(member: dict) -> RawGroup | JpegGroup:
    """A grouped member's images (a RawGroup or a JpegGroup). One that does not parse ends its
    shard's read, as a truncated tar does (its images cannot be counted, so none after it could
    be placed)."""
    if JPEG_GROUP in member:
        return read_jpeg_group(member)
    data = member[RAW_PIXELS]
    shape, fortran_order, dtype, offset = npy_header(data)
    keys = read_keys(member, shape[:1])
    if keys is None or dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[1] != 3 or len(data) != offset + math.prod(shape):
        raise ValueError(f"raw group {member['__key__']}: {dtype} pixels {shape} ({len(data)} bytes) are not N x 3 x H x W "
                         "uint8 beside N keys")
    return RawGroup(member["__url__"], keys, torch.frombuffer(writable(data), dtype=torch.uint8, offset=offset).view(shape))  # no copy


def read_jpeg_group(member: dict) -> JpegGroup:
    data, sizes, lengths, keys = member[JPEG_GROUP], member.get(JPEG_SIZES), None, None
    if sizes:
        shape, fortran_order, dtype, offset = npy_header(sizes)
        if dtype.kind in "iu" and len(shape) == 1 and not fortran_order:
            lengths = np.frombuffer(sizes, dtype, count=shape[0], offset=offset)
            keys = read_keys(member, shape)
    if keys is None or (lengths <= 0).any() or int(lengths.sum()) != len(data):
        raise ValueError(f"jpeg group {member['__key__']}: {len(data)} bytes of JPEGs are not the sum of N sizes beside N keys")
    return JpegGroup(member["__url__"], keys, list(torch.frombuffer(writable(data), dtype=torch.uint8).split(lengths.tolist())))


def read_keys(member: dict, shape: tuple[int, ...]) -> list[str] | None:
    """The group's keys (KEY.keys.npy), when they are N = shape[0] strings; None otherwise."""
    if RAW_KEYS not in member or len(shape) != 1:
        return None
    key_shape, key_fortran, key_dtype, key_offset = npy_header(member[RAW_KEYS])
    if key_shape != shape or key_fortran or key_dtype.kind != "U":
        return None
    return np.frombuffer(member[RAW_KEYS], key_dtype, count=shape[0], offset=key_offset).tolist()


def writable(data: bytes | bytearray) -> bytearray:
    return bytearray(data) if isinstance(data, bytes) else data  # torch wraps only writable buffers


def npy_header(data: bytes | bytearray) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, where the array starts) of a .npy file's bytes. A raw shard's
    groups share a few headers: each is parsed once (numpy's parser evaluates it as a literal)."""
    length_size = 2 if data[6:7] == b"\x01" else 4  # version 1: a 2-byte header length, later ones 4
    header_end = 8 + length_size + int.from_bytes(data[8:8 + length_size], "little")
    return parse_npy_header(bytes(data[:header_end]))


@functools.lru_cache(maxsize=64)
def parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(header)  # numpy's own parser: no pickle
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()
