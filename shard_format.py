"""A sharded dataset on disk or in object storage: litdata chunks of encoded images plus a tag index.

``python dataset_loader.py prepare --format litdata`` (``shard_prepare``) writes, in a folder or
under an ``s3://`` URL::

    index.json, chunk-*.bin   litdata's chunks (``litdata.optimize``): one item per sample,
                              {"id": sample id, "image": the encoded image bytes}, item i = row i
    tag_index.npz             the scan of the source: every kept sample's id, source path, tags,
                              categories and rating (a ``SampleTable``, row i = item i), every
                              skipped sample (``SkippedSamples``) and the scan's report fields
    prepare_report.json       the scan's report (the shape of a run's data_report.json) + chunk figures
    skipped_samples.csv       every source member left out, with its reason (``skip_list``)

Training reads the tag index as its scan (split, vocabulary and flip audit need no image) and the
images by row through litdata's ``StreamingDataset`` random access (``ShardImages``): local chunks
are read in place, remote ones by byte-range requests. Object-storage credentials and the endpoint
come from the usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ...) that boto3 reads; nothing of them is stored. A storage failure is a
``ShardUnavailableError``, never counted as a bad image.

It imports ``dataset_scan`` (``DatasetScan``, ``SKIP_REASONS``), ``sample_table``,
``scan_index`` (``PathSet``: ids to rows; ``scan_arrays``: the tag index is the scan index's layout) and ``file_io``; litdata and boto3 are imported only when
a sharded dataset is used (``requirements-shards.txt``).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dataset_scan import DatasetScan
from file_io import atomic_write_bytes
from sample_table import SampleTable
from scan_index import PathSet, scan_arrays, scan_from_arrays

__all__ = [
    "SHARD_INDEX_FILE",
    "PREPARE_REPORT_FILE",
    "SHARD_FORMAT_VERSION",
    "ShardUnavailableError",
    "short_error",
    "is_remote",
    "is_shard_dataset",
    "storage_options",
    "save_tag_index",
    "load_tag_index",
    "ShardImages",
]

SHARD_INDEX_FILE = "tag_index.npz"
PREPARE_REPORT_FILE = "prepare_report.json"
LITDATA_INDEX_FILE = "index.json"
SHARD_FORMAT_VERSION = 1
REMOTE_SCHEMES = ("s3://",)
# a dead endpoint must fail in seconds with a clear message, not after litdata's 1000 adaptive retries
_S3_RETRIES = 4
_S3_CONNECT_TIMEOUT_S = 5
_S3_READ_TIMEOUT_S = 60


class ShardUnavailableError(RuntimeError):
    """The sharded dataset's storage could not be read (not a bad image: the run must stop)."""


def short_error(exc: BaseException) -> str:
    """An error's own message: for one re-raised from a DataLoader worker ("Caught X in DataLoader worker
    process N. Original Traceback ..."), the original exception's line without the traceback."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    head, found, rest = last.partition(f"{type(exc).__name__}: ")  # "module.Name: message"
    return rest if found and " " not in head else last


def is_remote(root: str | Path) -> bool:
    """Whether `root` is an object-storage URL (s3://)."""
    return str(root).startswith(REMOTE_SCHEMES)


def is_shard_dataset(root: str | Path) -> bool:
    """Whether `root` names a sharded dataset: an s3:// URL, or a folder holding index.json and the tag index."""
    if not str(root):
        return False
    if is_remote(root):
        return True
    folder = Path(root)
    return (folder / LITDATA_INDEX_FILE).is_file() and (folder / SHARD_INDEX_FILE).is_file()


def storage_options() -> dict[str, Any]:
    """litdata's boto3 client options for a remote dataset: few retries and short timeouts. The endpoint
    and credentials are left to boto3's environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    import botocore.config

    config = botocore.config.Config(
        retries={"max_attempts": _S3_RETRIES, "mode": "standard"}, connect_timeout=_S3_CONNECT_TIMEOUT_S, read_timeout=_S3_READ_TIMEOUT_S
    )
    return {"config": config}


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix without trailing '/') of an s3:// URL; ValueError naming it when it has no bucket."""
    rest = str(url)[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: an s3:// URL needs a bucket (s3://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    """A boto3 S3 client from the environment (endpoint, region, credentials), with storage_options' retries."""
    import boto3

    return boto3.session.Session().client("s3", **storage_options())


def _storage_error(url: str, exc: BaseException) -> ShardUnavailableError:
    """The error that stops a run when the storage cannot be read, naming the URL and the endpoint variable."""
    if not is_remote(url):
        return ShardUnavailableError(f"{url}: the sharded dataset's chunks cannot be read ({type(exc).__name__}: {exc}); prepare it again")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
    return ShardUnavailableError(
        f"{url}: the sharded dataset cannot be read from object storage ({type(exc).__name__}: {exc}); endpoint: {endpoint} "
        "(AWS_ENDPOINT_URL). Check that the server is reachable and the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY) are set, then resume the run from its last checkpoint"
    )


def fetch_file(url: str, name: str) -> bytes:
    """The bytes of file `name` of a remote dataset (small files: the tag index, the report)."""
    import botocore.exceptions

    bucket, prefix = split_url(url)
    key = f"{prefix}/{name}" if prefix else name
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(
                f"{url}: no {name} there (not a sharded dataset written by 'dataset_loader.py prepare --format litdata')"
            ) from exc
        raise _storage_error(url, exc) from exc
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise _storage_error(url, exc) from exc


def upload_folder(folder: str | Path, url: str, last: tuple[str, ...] = (LITDATA_INDEX_FILE,)) -> int:
    """Upload every file of `folder` under the s3:// URL; the files named in `last` go last, so a
    dataset that shows an index.json is complete. Returns the bytes uploaded."""
    import botocore.exceptions

    bucket, prefix = split_url(url)
    client = s3_client()
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    names = [n for n in names if n not in last] + [n for n in last if n in names]
    total = 0
    for name in names:
        try:
            client.upload_file(str(Path(folder) / name), bucket, f"{prefix}/{name}" if prefix else name)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise _storage_error(url, exc) from exc
        total += (Path(folder) / name).stat().st_size
    return total


def save_tag_index(path: str | Path, scan: DatasetScan, extra: dict[str, Any]) -> None:
    """Write the tag index (the scan's table, skipped samples and report fields, `extra` metadata) atomically."""
    if not isinstance(scan.records, SampleTable):
        raise TypeError(f"save_tag_index needs a SampleTable, got {type(scan.records).__name__}")
    arrays = scan_arrays(scan, SHARD_FORMAT_VERSION, extra=extra)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, [buffer.getvalue()])


def _read_tag_index(data: bytes, where: str) -> tuple[DatasetScan, dict[str, Any]]:
    """(scan, extra metadata) from a tag index's bytes; ValueError naming `where` when malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            scan, meta = scan_from_arrays(f, SHARD_FORMAT_VERSION)
            scan.seconds = float(meta["scan_seconds"])
            return scan, dict(meta["extra"])
    except (OSError, KeyError, EOFError, IndexError, TypeError, ValueError) as exc:  # ValueError covers JSON and .npz errors
        raise ValueError(f"{where}: unreadable tag index ({type(exc).__name__}: {exc})") from exc


def load_tag_index(root: str | Path) -> tuple[DatasetScan, dict[str, Any]]:
    """The scan stored beside a sharded dataset's chunks and its metadata (chunk count, bytes, source)."""
    where = f"{str(root).rstrip('/')}/{SHARD_INDEX_FILE}"
    if is_remote(root):
        return _read_tag_index(fetch_file(str(root), SHARD_INDEX_FILE), where)
    path = Path(root) / SHARD_INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tag index (not a sharded dataset written by 'dataset_loader.py prepare --format litdata')")
    return _read_tag_index(path.read_bytes(), where)


class ShardImages:
    """The encoded image of each row of a sharded dataset, read through litdata's StreamingDataset
    (opened lazily in each process: pickling carries only the location)."""

    def __init__(self, root: str | Path, table: SampleTable, cache_dir: str | Path | None = None) -> None:
        """`table`: the dataset's whole tag index (row i = item i); `cache_dir`: litdata's cache for a remote dataset."""
        self.root = str(root) if is_remote(root) else os.path.abspath(root)
        self.cache_dir = str(cache_dir) if cache_dir else None
        self._table: SampleTable | None = table
        self._dataset: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """The location only: a worker opens its own reader and never needs the ids."""
        return {"root": self.root, "cache_dir": self.cache_dir, "_table": None, "_dataset": None}

    def rows_for(self, records: SampleTable) -> np.ndarray:
        """The dataset row of each record (matched by sample id), int64 (N,); ValueError when one is missing."""
        if self._table is None:
            raise ValueError("ShardImages.rows_for runs in the process that loaded the tag index")
        rows = PathSet(self._table.id_blob, self._table.id_offsets).rows(records.id_blob, records.id_offsets)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise ValueError(f"{self.root}: {len(missing)} samples are not in the tag index (first: {records.sample_id(int(missing[0]))!r})")
        return rows

    def _open(self) -> Any:
        """This process's StreamingDataset over the chunks."""
        import litdata

        if is_remote(self.root):
            cache = self.cache_dir or tempfile.mkdtemp(prefix="shard-cache-")
            try:
                return litdata.StreamingDataset(self.root, cache_dir=cache, storage_options=storage_options())
            except Exception as exc:  # litdata wraps the client's failures in several types; it is stopped here, not counted
                raise _storage_error(self.root, exc) from exc
        return litdata.StreamingDataset(self.root)

    def read(self, row: int, sample_id: str) -> bytes:
        """The encoded image of `row`. ShardUnavailableError when the storage fails or the item is
        another sample (a tag index that does not belong to these chunks): both stop the run, neither
        is a bad image."""
        if self._dataset is None:
            self._dataset = self._open()
        try:
            item = self._dataset[int(row)]
        except Exception as exc:  # litdata and its clients (botocore, obstore, OSError) raise many types: each stops the run
            raise _storage_error(self.root, exc) from exc
        if not isinstance(item, dict) or item.get("id") != sample_id:
            found = item.get("id") if isinstance(item, dict) else type(item).__name__
            raise ShardUnavailableError(
                f"{self.root}: item {row} holds sample {found!r}, the tag index says {sample_id!r}: the chunks and "
                f"{SHARD_INDEX_FILE} do not belong together; prepare the dataset again"
            )
        return bytes(item["image"])
