"""The compressed prepared cache's codec: letterboxed uint8 image <-> JPEG bytes.

This module owns how the prepared cache (``prepared_cache``, format ``jpeg``) encodes an image
once at build time (``encode_jpeg``: Pillow, baseline, Huffman-optimised, 4:2:0 chroma) and how
it is decoded again: in a DataLoader worker (``decode_jpeg_chw``, with the fastest decoder this
machine has, ``worker_decoder``) or on the training device for a whole batch
(``decode_jpeg_batch``, ``torchvision.io.decode_jpeg``; nvJPEG on CUDA). All decoders here are
libjpeg-turbo with its accurate integer DCT and fancy upsampling, so they agree with each other
(measured: identical pixels on CPU; BENCHMARKS.md "Cache formats").

Decoder order in workers: ``simplejpeg`` (optional, ``requirements-fast.txt``: 4-8% more images
per second per worker than torchvision, and it imports in milliseconds instead of torchvision's
~1.4 s per worker process), then ``torchvision.io.decode_jpeg`` (always installed:
requirements.txt; deprecated since torchvision 0.29 in favour of TorchCodec, so it is probed, not
assumed), then Pillow (always works, ~25% slower). torchvision is imported only when first
needed: importing it would cost every process that never decodes a JPEG cache over a second.

It imports numpy, Pillow and torch, and no project module.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["JPEG_SUBSAMPLING", "DECODERS", "encode_jpeg", "available_decoders", "worker_decoder", "decode_jpeg_chw", "decode_jpeg_batch"]

# 4:2:0 (chroma at half resolution), measured at quality 90 against 4:4:4: 9-24% smaller and
# 13-39% faster to decode, for 0.35-0.9 grey levels more mean error (BENCHMARKS.md "Cache formats");
# 4:4:4 would put a worker at the 1,000 images/s floor on anime-like content
JPEG_SUBSAMPLING = "4:2:0"
_PIL_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
DECODERS = ("simplejpeg", "torchvision", "pillow")

# per process: decoder name -> usable (probed once with a real decode)
_probed: dict[str, bool] = {}


def encode_jpeg(image: np.ndarray, quality: int, subsampling: str = JPEG_SUBSAMPLING) -> bytes:
    """Baseline JPEG of an (H, W, 3) uint8 RGB array (Huffman tables optimised: smaller, decodes as fast)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"encode_jpeg needs an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if subsampling not in _PIL_SUBSAMPLING:
        raise ValueError(f"subsampling must be one of {sorted(_PIL_SUBSAMPLING)}, got {subsampling!r}")
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, "JPEG", quality=int(quality), subsampling=_PIL_SUBSAMPLING[subsampling], optimize=True)
    return buffer.getvalue()


def _decode_simplejpeg(data: np.ndarray) -> torch.Tensor:
    """simplejpeg: (H, W, 3) array, returned as a (3, H, W) view."""
    import simplejpeg  # optional (requirements-fast.txt); worker_decoder checked it imports

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view


def _decode_torchvision(data: np.ndarray) -> torch.Tensor:
    """torchvision.io.decode_jpeg on the CPU: a contiguous (3, H, W) tensor."""
    from torchvision.io import ImageReadMode, decode_jpeg  # deferred: importing torchvision costs ~1.4 s

    # a private copy: torch warns on (and must not write through) the read-only shard memory map
    return decode_jpeg(torch.from_numpy(np.array(data, dtype=np.uint8)), mode=ImageReadMode.RGB)  # (3, H, W)


def _decode_pillow(data: np.ndarray) -> torch.Tensor:
    """Pillow: the decoder that is always there; (3, H, W) view."""
    with Image.open(io.BytesIO(memoryview(data))) as img:
        img.load()
        # convert() copies even an RGB image (measured: 2.6x slower); np.array makes it writable
        pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view


_DECODE: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
    "simplejpeg": _decode_simplejpeg,
    "torchvision": _decode_torchvision,
    "pillow": _decode_pillow,
}


def _probe(name: str) -> bool:
    """Whether decoder `name` imports and decodes a tiny JPEG in this process (memoised)."""
    if name not in _probed:
        sample = np.frombuffer(encode_jpeg(np.full((8, 8, 3), 128, np.uint8), 90), dtype=np.uint8)
        try:
            _probed[name] = tuple(_DECODE[name](sample).shape) == (3, 8, 8)
        except (ImportError, RuntimeError, OSError, ValueError, TypeError):
            # not installed, or a build without JPEG support (torchvision raises RuntimeError)
            _probed[name] = False
    return _probed[name]


def available_decoders() -> list[str]:
    """The worker decoders that work in this process, fastest first."""
    return [name for name in DECODERS if _probe(name)]


def worker_decoder(preferred: str | None = None) -> str:
    """The decoder a worker uses: `preferred` when it works here, else the first available one."""
    if preferred is not None:
        if preferred not in _DECODE:
            raise ValueError(f"unknown JPEG decoder {preferred!r}; expected one of {list(DECODERS)}")
        if _probe(preferred):
            return preferred
    return available_decoders()[0]  # Pillow always decodes JPEG: never empty


def decode_jpeg_chw(data: np.ndarray, decoder: str) -> torch.Tensor:
    """Decode one JPEG (1-D uint8 array of its bytes) to a (3, H, W) uint8 RGB tensor (maybe a view)."""
    try:
        return _DECODE[decoder](data)
    except (RuntimeError, ValueError) as exc:
        # simplejpeg raises ValueError, torchvision RuntimeError on corrupt data: the caller's
        # IMAGE_ERRORS (OSError) path records the sample as undecodable
        raise OSError(f"JPEG decode failed ({decoder}): {exc}") from exc


def decode_jpeg_batch(encoded: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Decode K JPEGs (1-D uint8 CPU tensors) on `device` into one (K, 3, H, W) uint8 tensor.

    torchvision.io.decode_jpeg: nvJPEG batched decode on CUDA, libjpeg-turbo on the CPU (the same
    code path, so CI covers it with device="cpu")."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # deferred: importing torchvision costs ~1.4 s
    except ImportError as exc:  # torchvision 0.29 deprecated its decoders; a later release may drop them
        raise RuntimeError(f"data.decode_on_device needs torchvision.io.decode_jpeg, which this torchvision lacks ({exc}); set it to false") from exc
    if not encoded:
        raise ValueError("decode_jpeg_batch got no images")
    target = torch.device(device)
    images: Any = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=target)  # K x (3, H, W)
    return torch.stack(images)  # (K, 3, H, W)
