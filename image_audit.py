"""The start-up image check and the pools the start-up check runs on.

This module owns ``verify_image`` (one file under verify mode none, header or decode: missing,
undecodable, decompression bombs), ``check_images`` (a list of them on a thread pool, decoder
warnings recorded instead of printed), ``map_threads`` (the chunked thread map) and
``ProcessMap``: a function mapped over jobs in order on one spawned process a usable core
(``scan_processes``), with few jobs in flight. Opening headers and parsing sidecars is Python work
under the GIL, so a big scan (``dataset_scan``) runs its chunks on a ``ProcessMap``; small ones stay
in the calling process. It imports ``image_preprocess`` (which exceptions mean an image is
unusable) and ``process_group`` (the usable cores); ``folder_pairing`` and ``dataset_scan`` call it.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import warnings
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

from image_preprocess import IMAGE_ERRORS
from process_group import usable_cpu_count

__all__ = ["map_threads", "ProcessMap", "scan_processes", "verify_image", "check_images", "check_images_job"]


def scan_processes() -> int:
    """How many processes a parallel start-up check may use: one a usable core, at most 8."""
    return min(usable_cpu_count(), 8)


def _ready() -> int:
    """A job that only proves a worker has started (its imports done)."""
    return os.getpid()


class ProcessMap:
    """Maps a function over jobs in job order: here when `processes` < 2, else on that many
    spawned processes (Windows has no fork), started when the map is entered so that they boot
    while the caller prepares the first jobs. A map keeps at most `in_flight` jobs submitted at a
    time (default two a process), so a job's input and output exist only while it is in flight.
    The function must be module-level; an error in a job is raised at its turn."""

    def __init__(self, processes: int) -> None:
        """No processes yet (see __enter__)."""
        self.processes = processes
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "ProcessMap":
        """Start the processes (when more than one)."""
        if self.processes >= 2:
            self.pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.processes):
                self.pool.submit(_ready)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the processes; jobs not yet started are cancelled when an error ends the map."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
            self.pool = None

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any], in_flight: int = 0) -> Iterator[Any]:
        """fn(job) for every job, yielded in job order."""
        if self.pool is None:
            for job in jobs:
                yield fn(job)
            return
        limit = in_flight or 2 * self.processes
        pending: collections.deque[Future] = collections.deque()
        for job in jobs:
            pending.append(self.pool.submit(fn, job))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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


def check_images(paths: list[str], verify: str, num_threads: int) -> tuple[list[tuple[str | None, str]], list[tuple[str, str]]]:
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


def check_images_job(job: tuple[list[str], str, int]) -> tuple[list[tuple[str | None, str]], list[tuple[str, str]]]:
    """check_images of one (paths, verify, threads) job (module-level: a spawned pool runs it)."""
    return check_images(*job)
