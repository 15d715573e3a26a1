"""Issue 12 end to end: a folder of hostile data (names that are not UTF-8, links out of the root,
oversized sidecars, surrogate tags, files that only fail when decoded, odd modes) goes through
training with two workers, `prepare`, `vocabulary.py build` and `validation_loop.py --data`, each
counting what it skipped by reason; validation metrics equal those of the clean folder; a 10 MiB
tag string costs no memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import broken_corpus as bc
from conftest import ROOT, TINY_RUN, run_cli
from data_fixtures import listing

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="POSIX names and links")]

HOSTILE_RUN = TINY_RUN + [
    "data.num_workers=2",
    "data.batch_size=8",
    "data.val_fraction=0.25",
    "training.epochs=2",
    "augment.flip_prob=0",
    "data.max_bad_fraction=0.3",
    "data.verify=header",
]


def _train(base: Path, data: Path, name: str, extra: list[str], timeout: float = 600) -> tuple[Path, str]:
    """Run train_direct.py as a user would; (run folder, stdout)."""
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in HOSTILE_RUN + [f"data.root={data}", f"output_root={base / 'runs'}", f"experiment_name={name}", *extra]:
        args += ["--set", o]
    proc = run_cli(args, cwd=base, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base / "runs" / name, proc.stdout


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> bc.HostileCorpus:
    """The hostile corpus, once for the module."""
    return bc.make_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def trained(hostile: bc.HostileCorpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A two-worker run over the hostile corpus with a prepared cache (whose build decodes every
    image, so the report is exact from the start)."""
    base = tmp_path_factory.mktemp("work")
    return _train(base, hostile.root, "hostile", [f"data.cache_dir={base / 'cache'}"])


def test_training_counts_every_reason_exactly(hostile: bc.HostileCorpus, trained: tuple[Path, str]) -> None:
    """data_report.json counts each hostile sample once under its reason; no decode failure
    reaches training or validation; the dataset folder is untouched."""
    run_dir, stdout = trained
    report = json.loads((run_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == hostile.expected_skips(decoded=True)
    assert report["dropped_tags"] == hostile.dropped_tags
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert set(split["train"]) | set(split["val"]) | set(split["excluded"]) == hostile.expected_ids(decoded=True)
    assert report.get("replaced_during_training", {}).get("failed", 0) == 0
    vocab = json.loads((run_dir / "vocabulary.json").read_text(encoding="utf-8"))["index_to_tag"]
    assert len(vocab) <= 7 and "common" in vocab  # common, shared, tag_0..tag_4
    assert "Corrupt EXIF" not in stdout  # counted in the report, not printed
    assert any("Corrupt EXIF" in k for k in report["decoder_warnings"])
    listed = _skip_list(run_dir)
    assert sorted(p for p, _, where, _ in listed if where == "cache") == sorted(hostile.decode_only_ids)
    _assert_start_up_rows_match(listed, report)


def _skip_list(run_dir: Path) -> list[tuple[str, str, str, str]]:
    """The run's complete list of skipped samples."""
    from skip_list import SKIP_LIST_FILE, read_skip_list

    return list(read_skip_list(run_dir / SKIP_LIST_FILE))


def _assert_start_up_rows_match(listed: list[tuple[str, str, str, str]], report: dict) -> None:
    """The list's start-up rows are the report's skip counts, each sample once (the cache's are counted with them)."""
    counts: dict[str, int] = {}
    for _, reason, where, _ in listed:
        if where in ("start-up", "cache"):
            counts[reason] = counts.get(reason, 0) + 1
    assert counts == report["skipped"]
    assert len({(p, where) for p, _, where, _ in listed}) == len(listed)


def test_header_only_run_skips_in_validation_and_replaces_in_training(hostile: bc.HostileCorpus, tmp_path: Path) -> None:
    """Without a cache the two decode-only files reach the datasets: training replaces and
    records them, validation evaluates the rest and says how many it skipped."""
    run_dir, stdout = _train(tmp_path, hostile.root, "nocache", ["training.epochs=1"])
    report = json.loads((run_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == hostile.expected_skips(decoded=False)
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    val_bad = set(split["val"]) & set(hostile.decode_only_ids)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    vals = [e for e in events if e.get("type") == "val"]
    assert vals and all(e["num_samples"] == len(split["val"]) - len(val_bad) for e in vals)
    failed = report["replaced_during_training"]["samples"]
    assert set(failed) <= set(hostile.decode_only_ids) and set(failed.values()) <= {"image_undecodable"}
    listed = _skip_list(run_dir)
    _assert_start_up_rows_match(listed, report)
    later = {p: where for p, _, where, _ in listed if where in ("training", "validation")}
    assert set(later) == set(failed) | val_bad and all(later[p] == "validation" for p in val_bad - set(failed))


def test_prepare_and_vocabulary_build_handle_the_folder(hostile: bc.HostileCorpus, tmp_path: Path) -> None:
    """`prepare` writes its index (failures recorded by reason); `vocabulary.py build` writes a
    vocabulary; both print the skip counts; --out inside the dataset is refused before any work."""
    before = listing(hostile.root)
    out = tmp_path / "cache"
    proc = run_cli(
        [str(ROOT / "dataset_loader.py"), "prepare", "--data", str(hostile.root), "--image-size", "16", "--out", str(out), "--workers", "2"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["failed"] == {"image_undecodable": len(hostile.decode_only_ids)}
    assert report["scan"]["skipped"] == hostile.expected_skips(decoded=False)
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert set(index["ids"]) == hostile.expected_ids(decoded=True) and set(index["failed"]) == set(hostile.decode_only_ids)
    inside = run_cli(
        [str(ROOT / "dataset_loader.py"), "prepare", "--data", str(hostile.root), "--image-size", "16", "--out", str(hostile.root / "cache")],
        cwd=tmp_path,
    )
    assert inside.returncode == 2 and "inside the dataset folder" in inside.stderr and inside.stdout == ""
    proc = run_cli(
        [str(ROOT / "vocabulary.py"), "build", "--data", str(hostile.root), "--out", str(tmp_path / "vocab.json"), "--no-ignore"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name_not_utf8: 1" in proc.stdout and "tags dropped: tag_not_utf8: 1, tag_too_long: 1" in proc.stdout
    assert "tags dropped: tags/surrogate.png.json: 1 tag_not_utf8" in proc.stdout  # names the sidecar
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))["index_to_tag"]
    assert "common" in vocab and all(len(t) <= 256 for t in vocab)
    assert listing(hostile.root) == before


def test_validation_metrics_equal_without_the_bad_images(hostile: bc.HostileCorpus, trained: tuple[Path, str], tmp_path: Path) -> None:
    """validation_loop.py --data on the hostile folder gives the metrics of the same folder with
    only its usable samples: bad images are skipped and counted, never substituted."""
    run_dir, _ = trained
    clean = tmp_path / "clean"
    for sid in hostile.expected_ids(decoded=True):
        for name in (sid, sid + ".json"):
            (clean / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hostile.root / name, clean / name)
    results = {}
    for label, data in (("hostile", hostile.root), ("clean", clean)):
        out = tmp_path / f"eval_{label}"
        proc = run_cli(
            [
                str(ROOT / "validation_loop.py"),
                "--checkpoint",
                str(run_dir / "checkpoints" / "last"),
                "--data",
                str(data),
                "--out",
                str(out),
                "--num-workers",
                "2",
                "--device",
                "cpu",
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results[label] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    hostile_m, clean_m = results["hostile"], results["clean"]
    assert hostile_m["num_skipped"] == len(hostile.decode_only_ids) and clean_m["num_skipped"] == 0
    assert set(hostile_m["skipped_samples"]) == set(hostile.decode_only_ids)
    for key in ("num_samples", "mAP", "f1_micro", "f1_macro", "rating_accuracy"):
        assert hostile_m[key] == clean_m[key], key
    refused = run_cli(
        [str(ROOT / "validation_loop.py"), "--checkpoint", str(run_dir / "checkpoints" / "last"), "--data", str(clean), "--out", str(clean / "eval")],
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "--out" in refused.stderr and "inside the dataset folder" in refused.stderr


def _peak_rss_kb(stderr: str) -> int:
    """Maximum resident set size from GNU time -v."""
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))


@pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="needs GNU time")
def test_a_ten_mib_tag_string_costs_no_memory(tmp_path: Path) -> None:
    """Peak memory of a short run with one 10 MiB tag string stays within 10% of the run without it."""
    peaks = {}
    for label, huge in (("plain", False), ("huge", True)):
        corpus = bc.make_hostile_corpus(tmp_path / label, huge_tag_string=huge, with_links=False)
        args = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
        for o in HOSTILE_RUN + [
            f"data.root={corpus.root}",
            f"output_root={tmp_path / label / 'runs'}",
            "experiment_name=m",
            "data.num_workers=0",
            "training.max_steps=2",
        ]:
            args += ["--set", o]
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[label] = _peak_rss_kb(proc.stderr)
    print(f"peak RSS: without {peaks['plain']} KiB, with a 10 MiB tag string {peaks['huge']} KiB")
    assert peaks["huge"] <= 1.10 * peaks["plain"], peaks
