"""A sample's image as pixels: JPEG/PNG/WebP bytes (torchvision) or a raw image -> 3 x H x W
uint8, one at a time, or a batch's JPEGs in one `decode_jpeg` call (the wrapper's checks and its
deprecation warning are paid once per batch, not per image); scaling to [-1, 1] once per batch,
on the training process's device (loader processes hand over uint8: a quarter of the bytes).
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from dcgan_dist.data.resize import crop_resize

PIXELS = "pixels"  # a raw image: a 3 x H x W uint8 tensor, one of its group's (stream.tar_samples unpacks groups)
JPEG_KEYS = ("jpg", "jpeg")
IMAGE_KEYS = (PIXELS, *JPEG_KEYS, "png", "webp")


def image_key(sample: dict) -> str | None:
    for key in IMAGE_KEYS:  # a loop, not next(genexpr): this runs for every sample
        if key in sample:
            return key
    return None


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: torch wants a writable buffer


def check_size(image: torch.Tensor, image_size: int) -> torch.Tensor:
    if image.shape[-2:] != (image_size, image_size):
        raise ValueError(f"image is {tuple(image.shape[-2:])}, not {image_size}x{image_size}")
    return image


def decode_pixels(data: bytes | torch.Tensor, image_size: int) -> torch.Tensor:
    """Encoded image bytes (or a raw image's pixels) -> 3 x H x W uint8 (grey becomes 3 channels)."""
    if isinstance(data, torch.Tensor):
        return check_size(data, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        return check_size(decode_image(as_tensor(data), mode=ImageReadMode.RGB), image_size)


def decode_jpeg_list(jpegs: list[torch.Tensor], image_size: int, device: str | torch.device = "cpu") -> list[torch.Tensor] | None:
    """Encoded JPEGs (uint8 tensors) decoded by one `decode_jpeg(list, device=...)` call, as
    uint8 on `device`; None when the call fails (one corrupt JPEG fails the whole list) or an
    image has the wrong size: the caller then decodes them one by one."""
    decoded = decode_jpeg_call(jpegs, device)
    return decoded if decoded is not None and all(image.shape[-2:] == (image_size, image_size) for image in decoded) else None


def decode_jpeg_call(jpegs: list[torch.Tensor], device: str | torch.device = "cpu") -> list[torch.Tensor] | None:
    """One `decode_jpeg(list)` call, RGB; None when it fails (one corrupt JPEG fails the whole list)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def decode_jpeg_batch(jpegs: list[torch.Tensor], image_size: int, new_batch=None) -> torch.Tensor | None:
    """Encoded JPEGs -> one N x 3 x H x W uint8 batch, decoded by one `decode_jpeg(list)` call and
    stacked as they lie (channels-last; in `new_batch(True)` when given, as stack_images). None
    when one does not decode or is not image_size square: the caller decodes them one by one. The
    sizes are checked by the stack (equal sizes) and on the first image, not image by image."""
    decoded = decode_jpeg_call(jpegs)
    if decoded is None or decoded[0].shape != (3, image_size, image_size):
        return None
    batch = new_batch(True) if new_batch is not None else channels_last_batch(len(jpegs), 3, image_size, image_size)
    try:
        return torch.stack(decoded, out=batch)
    except RuntimeError:  # an image of another size
        return None


def decode_jpegs(samples: list[dict | None], image_size: int) -> list[torch.Tensor | None]:
    """The JPEGs among `samples` decoded in one call (decode_jpeg_list); None for every other
    sample, and for all of them when that call fails. Their bytes are copied into one buffer
    (torch wants writable memory), not one each."""
    keys = [image_key(sample) if sample is not None else None for sample in samples]
    at = [i for i, key in enumerate(keys) if key in JPEG_KEYS]
    images: list[torch.Tensor | None] = [None] * len(samples)
    if not at:
        return images
    jpegs = [samples[i][keys[i]] for i in at]
    encoded = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8).split([len(jpeg) for jpeg in jpegs])
    for i, image in zip(at, decode_jpeg_list(list(encoded), image_size) or ()):
        images[i] = image
    return images


def decode_on_device(jpegs: list[torch.Tensor], image_size: int, device: str | torch.device,
                     resize: bool = False) -> tuple[torch.Tensor, int]:
    """--decode gpu: a batch of encoded JPEGs -> (N x 3 x H x W uint8 on `device`, how many were
    corrupt). A corrupt one's place takes the image before it in the batch (the first good one,
    at the start), as the epoch reader fills places; ValueError when none decodes. `resize`:
    JPEGs of any size, each centre-cropped and resized on the device (resize.crop_resize)."""
    decode_list = partial(decode_resized_list, device=device) if resize else partial(decode_jpeg_list, device=device)
    images = decode_list(jpegs, image_size)
    if images is not None:
        return torch.stack(images), 0
    one_by_one = [decode_list([jpeg], image_size) for jpeg in jpegs]
    good = [decoded[0] for decoded in one_by_one if decoded is not None]
    if not good:
        raise ValueError(f"none of the {len(jpegs)} JPEGs of a batch decodes on {device}")
    filled, last = [], good[0]
    for decoded in one_by_one:
        last = decoded[0] if decoded is not None else last
        filled.append(last)
    return torch.stack(filled), len(jpegs) - len(good)


def decode_resized_list(jpegs: list[torch.Tensor], image_size: int, device: str | torch.device = "cpu") -> list[torch.Tensor] | None:
    """decode_jpeg_list() of JPEGs of any size, each centre-cropped and resized to image_size on `device`."""
    decoded = decode_jpeg_call(jpegs, device)
    return None if decoded is None else [crop_resize(image, image_size) for image in decoded]


def stack_images(images: list[torch.Tensor], new_batch=None) -> torch.Tensor:
    """3 x H x W uint8 images -> one N x 3 x H x W batch, in one copy that keeps the decoder's
    layout: torchvision's decoders give each image as a view of H x W x 3 pixels, and stacking
    them as they lie is a memcpy where a contiguous NCHW stack is a transpose (a fifth of a 64 px
    JPEG's decode time, measured). The batch is then channels-last in memory, the layout the
    model wants by default (--channels-last). Raw images (already 3 x H x W) stack as they are.
    `new_batch(channels_last)`: where to stack them (a loader worker's ring slot, handover.py);
    by default a new tensor."""
    channels, height, width = images[0].shape
    hwc = (1, width * channels, channels)  # the strides of a 3 x H x W view of H x W x 3 pixels
    channels_last = all(image.stride() == hwc for image in images)
    if new_batch is not None:
        return torch.stack(images, out=new_batch(channels_last))
    if channels_last:
        return torch.stack(images, out=channels_last_batch(len(images), channels, height, width))
    return torch.stack(images)


def channels_last_batch(count: int, channels: int, height: int, width: int) -> torch.Tensor:
    """A new uint8 N x C x H x W batch laid out as N x H x W x C in memory (the decoder's layout)."""
    return torch.empty((count, height, width, channels), dtype=torch.uint8).permute(0, 3, 1, 2)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (0 and 255 exactly -1 and 1), in the memory layout they
    came in: the training loop puts a batch into the model's layout (channels-last by default,
    which a decoded batch already has; forcing NCHW here cost a transpose the loop then undid)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def decode(data: bytes | torch.Tensor, image_size: int) -> torch.Tensor:
    """One image -> 3 x H x W float in [-1, 1]."""
    return to_unit_range(decode_pixels(data, image_size))
