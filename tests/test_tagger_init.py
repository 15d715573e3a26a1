"""Tests for tagger_init: a new model started from an exported (released) tagger, matched by tag name."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_eval import LoadedCheckpoint
from conftest import TrainedRun
from image_preprocess import normalize_images
from model_architecture import SimplifiedTagger
from tagger_init import extend_vocabulary, init_from_released, read_released_tagger
from vocabulary import TagVocabulary
from wd_export_helpers import CHARACTER_TAGS, characterised_checkpoint, export, load, onnx_probabilities, validation_images

NUM_TRAIN = 200  # the new run's training samples, for the frequency prior of new tags


@dataclass
class Release:
    """An export of the trained run and the checkpoint it came from."""

    folder: Path
    ck: LoadedCheckpoint
    images: np.ndarray  # (N, S, S, 3) uint8 validation images


@pytest.fixture(scope="module")
def release(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """export_model.py run on the trained run (with some tags as characters)."""
    base = tmp_path_factory.mktemp("release")
    checkpoint = characterised_checkpoint(trained_run, base / "run")
    export(checkpoint, base / "wd")
    ck = load(checkpoint)
    return Release(base / "wd", ck, validation_images(ck).images[:24])


def _new_vocab(ck: LoadedCheckpoint) -> tuple[TagVocabulary, list[str], list[str]]:
    """The old tags minus three, in another order, plus two new ones; (vocab, dropped, new)."""
    old = ck.vocab.index_to_tag
    dropped, new = old[-3:], ["brand_new", "another_new"]
    tags = list(reversed(old[:-3])) + new
    return TagVocabulary(tags, {t: 5 + i for i, t in enumerate(tags)}, {}), dropped, new


def _model_for(ck: LoadedCheckpoint, vocab: TagVocabulary, **changes: object) -> SimplifiedTagger:
    """A fresh model of the checkpoint's shape for vocab, tag biases at the frequency prior (as train_direct builds it)."""
    cfg = dataclasses.replace(ck.model.cfg, num_tags=len(vocab), tag_bias_init=[f / NUM_TRAIN for f in vocab.frequencies_array()], **changes)
    return SimplifiedTagger(cfg).eval()


@pytest.mark.e2e
def test_shared_tags_start_with_the_exports_probabilities(release: Release) -> None:
    released = read_released_tagger(release.folder)
    vocab, dropped, new = _new_vocab(release.ck)
    model = _model_for(release.ck, vocab)
    new_rows = {
        t: (model.tag_head.weight[vocab.tag_to_index[t]].detach().clone(), float(model.tag_head.bias[vocab.tag_to_index[t]].detach())) for t in new
    }
    report = init_from_released(model, vocab, released)
    assert report.counts() == {"kept": len(vocab) - 2, "new": 2, "dropped": 3}
    assert sorted(report.dropped) == sorted(dropped) and report.new == new
    for tag, (weight, bias) in new_rows.items():  # new tags keep their initial row and frequency prior
        index = vocab.tag_to_index[tag]
        assert torch.equal(model.tag_head.weight[index], weight)
        assert bias == pytest.approx(math.log((vocab.tag_frequencies[tag] / NUM_TRAIN) / (1 - vocab.tag_frequencies[tag] / NUM_TRAIN)), abs=1e-5)
    names = released.labels.names
    expected = onnx_probabilities(release.folder, release.images)  # (N, 4 + T) the export's outputs
    batch = torch.from_numpy(release.images).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(normalize_images(batch, release.ck.preprocess.mean, release.ck.preprocess.std))
    probs = torch.sigmoid(out["tag_logits"]).numpy()
    for column, name in enumerate(names):
        if name in vocab.tag_to_index and column >= 4:
            np.testing.assert_allclose(probs[:, vocab.tag_to_index[name]], expected[:, column], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["rating_logits"].softmax(1).numpy(), expected[:, :4], rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_remove_calibration_gives_back_the_checkpoint_biases(release: Release) -> None:
    raw = read_released_tagger(release.folder, remove_calibration=True)
    ck = release.ck
    for tag, bias in raw.tag_bias.items():
        assert bias == pytest.approx(float(ck.model.tag_head.bias[ck.vocab.tag_to_index[tag]].detach()), abs=1e-5), tag


@pytest.mark.e2e
def test_extend_vocabulary_keeps_every_release_tag_first(release: Release) -> None:
    released = read_released_tagger(release.folder)
    data = TagVocabulary(["zz_new", "red", "circle"], {"zz_new": 9, "red": 7, "circle": 3}, {"zz_new": "general", "red": "general", "circle": ""})
    extended = extend_vocabulary(released.labels, data)
    release_tags = [*released.labels.general, *released.labels.character]
    assert extended.index_to_tag == release_tags + ["zz_new"]
    assert extended.tag_frequencies["zz_new"] == 9 and extended.tag_frequencies["square"] == 0
    assert extended.tag_categories["red"] == "general"  # the data's own category wins
    assert all(extended.tag_categories[t] == "character" for t in CHARACTER_TAGS if t != "red")


@pytest.mark.e2e
def test_other_sizes_resample_and_other_shapes_are_refused(release: Release) -> None:
    released = read_released_tagger(release.folder)
    vocab, _, _ = _new_vocab(release.ck)
    report = init_from_released(_model_for(release.ck, vocab, image_size=48), vocab, released)
    assert any("resampled" in note for note in report.notes)
    with pytest.raises(ValueError, match="depth"):
        init_from_released(_model_for(release.ck, vocab, depth=release.ck.model.cfg.depth + 1), vocab, released)
    with pytest.raises(ValueError, match="vocabulary"):
        init_from_released(_model_for(release.ck, vocab), release.ck.vocab, released)
