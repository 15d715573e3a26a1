"""The start-up image check: each image's header (or whole file) opened once, on threads or processes.

This module owns ``verify_image`` (one file under verify mode none, header or decode: missing,
undecodable, decompression bombs) and ``verify_images`` (all of a scan's images, decoder warnings
counted instead of printed). Opening headers is Python work under the GIL, so a scan of
``PARALLEL_VERIFY_MIN`` images or more spreads it over spawned processes (one a core), keeping
file order; smaller ones use a thread pool. ``map_threads`` is the chunked thread map the scan
also reads sidecars with. It imports ``image_preprocess`` (which exceptions mean an image is
unusable), ``process_group`` (the usable cores) and ``scan_limits`` (the warning log); ``dataset_scan`` calls it.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Sequence

from PIL import Image

from image_preprocess import IMAGE_ERRORS
from process_group import usable_cpu_count
from scan_limits import WarningLog

__all__ = ["PARALLEL_VERIFY_MIN", "map_threads", "verify_image", "verify_images"]

# scans with at least this many images to check open their headers in several processes
PARALLEL_VERIFY_MIN = 20_000


def _run_chunk(args: tuple[Any, list[Any], tuple[Any, ...]]) -> list[Any]:
    """Apply fn(item, *extra) to one chunk of items (a module-level helper for the thread pool)."""
    fn, items, extra = args
    return [fn(item, *extra) for item in items]


def map_threads(fn: Any, items: Sequence[Any], num_threads: int, *extra: Any, chunk: int = 256) -> list[Any]:
    """fn(item, *extra) for every item, in order, on a thread pool in chunks.

    Chunks keep the number of futures small: one future per file would cost ~1 KB each on a
    million-file dataset.
    """
    if num_threads <= 1 or len(items) <= chunk:
        return [fn(item, *extra) for item in items]
    jobs = [(fn, list(items[i : i + chunk]), extra) for i in range(0, len(items), chunk)]
    out: list[Any] = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for part in pool.map(_run_chunk, jobs):
            out.extend(part)
    return out


def verify_image(path: str, mode: str) -> tuple[str | None, str]:
    """(skip reason or None, detail) for one image under verify mode none|header|decode."""
    if mode == "none":
        return (None, "") if os.path.isfile(path) else ("image_missing", "file not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            limit = Image.MAX_IMAGE_PIXELS
            # Pillow only warns between 1x and 2x the limit; we treat the warning band as a bomb too
            if limit is not None and width * height > limit:
                return "decompression_bomb", f"{width}x{height} exceeds {limit} pixels"
            if width <= 0 or height <= 0:
                return "image_undecodable", f"empty size {width}x{height}"
            if mode == "decode":
                if img.format == "JPEG":  # DCT-scaled decode still reads every byte: truncation shows
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except FileNotFoundError:
        return "image_missing", "file not found"
    except Image.DecompressionBombError as exc:
        return "decompression_bomb", str(exc)
    except IMAGE_ERRORS as exc:
        return "image_undecodable", f"{type(exc).__name__}: {exc}"
    return None, ""


def _verify_chunk(paths: list[str], verify: str, num_threads: int) -> tuple[list[tuple[str | None, str]], list[tuple[str, str]]]:
    """verify_image over `paths` on a thread pool: (results, decoder warnings as (category, message)).

    catch_warnings swaps the process-wide filters, so warnings from the pool's threads are
    recorded too (nothing else runs while the scan does)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # verify_image checks the pixel count itself
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # small chunks: verification is slow per item and should spread over all threads
        results = map_threads(verify_image, paths, num_threads, verify, chunk=32)
    return results, [(item.category.__name__, str(item.message)) for item in caught]


def verify_images(paths: list[str], verify: str, num_threads: int, warning_log: WarningLog) -> list[tuple[str | None, str]]:
    """(skip reason or None, detail) for every path, in order; decoder warnings counted in `warning_log`.
    A large scan spreads the work over processes (one a core, spawned: Windows has no fork)."""
    processes = min(usable_cpu_count(), 8)
    if processes < 2 or len(paths) < PARALLEL_VERIFY_MIN:
        results, caught = _verify_chunk(paths, verify, num_threads)
        warning_log.add_messages(caught)
        return results
    size = -(-len(paths) // (processes * 4))  # a few chunks a process: an uneven one does not hold the others up
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    results = []
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part, caught in pool.map(_verify_chunk, chunks, [verify] * len(chunks), [2] * len(chunks)):
            results.extend(part)
            warning_log.add_messages(caught)
    return results
