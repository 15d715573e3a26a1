"""A local page to see a tagger: tag uploaded images with one or more models side by side, and look at where a run is wrong.

    python tag_app.py MODEL [MODEL ...] [--data DIR] [--host 127.0.0.1] [--port 7860] [--share]

MODEL is anything tag_images.py accepts (tagging.open_model): an export folder (model.onnx), a
timm-layout folder, a run folder or a checkpoint. The page (gradio, an optional dependency:
`pip install -r requirements-app.txt`) listens on 127.0.0.1 unless --host says otherwise, makes a
public link only with --share, and sends no usage data (gradio's analytics are off).

"Tag": upload images; each model's rating, character and general tags as probability bars, high
to low, with thresholds per category (defaults from the model's own thresholds.json, else 0.35 /
0.85) or MCut, the caption line exactly as tag_images.py writes it for those settings, and the
tag_images.py options that write it. With two or more models the tags only one model gives are
marked and every tag shows its probability minus the other models' highest. Models are opened
once; uploads are decoded with each model's preprocessing and run in batches. A file that cannot
be read, or a folder that is not a model ("Open another model"), gives a message and the page
goes on.

"Validation" (a checkpoint or run folder: its run's validation split, or --data; an export, timm or
release folder: --data): the evaluation validation_loop.py computes (model_eval's loader,
eval_reports.run_evaluation; an export folder evaluated through its ONNX model as tag_images.py runs
it), run once and kept with its reports in <run>/eval/<step>/, or eval/<folder name>/ where the page
was started for a model folder (predictions.npz next to per_tag.csv; reused while it is for the
same model and data); the per-tag table, searchable and sortable; per tag its
precision-recall curve and its worst images (highest-scored false positives, lowest-scored false
negatives) with their true and predicted tags. The page writes nothing else, and never into the
dataset or a model folder. The page's logic is in plain functions (`TagPage`, `ValidationData`)
that tests call without a browser; HTML comes from tag_views.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from Configuration_System import ConfigError
from data_setup import is_inside, prepare_eval_data
from dataset_scan import DataQualityError
from eval_reports import (
    PREDICTIONS_FILE,
    Predictions,
    check_out_location,
    load_predictions,
    model_eval_dir,
    per_tag_rows,
    result_from_predictions,
    run_evaluation,
    save_predictions,
    write_reports,
)
from file_io import display_path
from image_preprocess import PreprocessParams
from model_eval import load_model_for_eval, model_folder
from tag_views import (
    PAGE_CSS,
    ImageView,
    ModelView,
    TagLine,
    WorstImage,
    pr_curve_svg,
    precision_recall_points,
    tag_results_html,
    tag_table_html,
    worst_images_html,
)
from tagging import (
    CaptionOptions,
    TaggingModel,
    Thresholds,
    caption_tags,
    model_thresholds,
    open_model,
    predict,
    read_image,
    resolve_model_path,
    thresholds_for,
)
from wd_format import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, THRESHOLDS_FILE, TagDecision

if TYPE_CHECKING:  # gradio is imported when the page is built (import_gradio): the page's logic and its tests load without it
    import gradio as gr

__all__ = [
    "OpenedModel",
    "TagPage",
    "Tagged",
    "ValidationData",
    "build_app",
    "caption_options",
    "main",
    "parse_args",
    "prepare_validation",
    "render_tag_tab",
]

THUMBNAIL = PreprocessParams(image_size=96, pad_color=(255, 255, 255))
GALLERY = PreprocessParams(image_size=192, pad_color=(255, 255, 255))
# What opening a model or reading an evaluation may raise on a bad folder; anything else is a bug and shows as one.
MODEL_ERRORS = (FileNotFoundError, ValueError, ConfigError, DataQualityError, ImportError, OSError)
SORTS = {
    "AP, worst first": ("ap", False),
    "AP, best first": ("ap", True),
    "F1, worst first": ("f1", False),
    "F1, best first": ("f1", True),
    "support, most first": ("support", True),
    "frequency, most first": ("train_frequency", True),
    "tag name": ("tag", False),
}


# --------------------------------------------------------------------------------------------
# Models and tagging
# --------------------------------------------------------------------------------------------


@dataclass
class OpenedModel:
    """A model opened once for the page: its display name, what it was opened from, its own thresholds."""

    name: str
    path: str
    model: TaggingModel
    thresholds_file: Path | None
    key: str = ""  # the resolved path it was opened from (the same folder is opened once)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def thresholds(self, general: float, character: float, general_mcut: bool, character_mcut: bool, per_tag: bool) -> Thresholds:
        """The page's settings as tag_images.py would apply them (with per_tag: its --thresholds file)."""
        file = self.thresholds_file if per_tag else None
        return thresholds_for(self.model.labels, general, character, file, general_mcut, character_mcut)

    def default_settings(self) -> dict[str, Any]:
        """The settings the page opens with: the model's thresholds file when it has one, else 0.35 / 0.85."""
        base = thresholds_for(self.model.labels, DEFAULT_GENERAL_THRESHOLD, DEFAULT_CHARACTER_THRESHOLD, self.thresholds_file)
        return {
            "general": base.general,
            "character": base.character,
            "general_mcut": False,
            "character_mcut": False,
            "per_tag": bool(self.thresholds_file),
        }


@dataclass
class Tagged:
    """Uploaded files with each model's probabilities (rows of the files that could be read)."""

    paths: list[str]
    names: list[str]
    thumbnails: list[str]
    errors: dict[int, str]  # file index -> why it was not tagged
    probs: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # model name -> file index -> (4 + T,)


def _thumbnail(path: str) -> str:
    """A small PNG data URI of an image, "" when it cannot be read."""
    image, _ = read_image(path, THUMBNAIL)
    if image is None:
        return ""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tag_lines(model: str, names: Sequence[str], decisions: dict[str, TagDecision], rows: dict[str, dict[str, float]]) -> list[TagLine]:
    """The chosen tags of `model` among `names`, high to low, compared with the other models' choices and probabilities."""
    chosen = {m: {n for n, _ in (d.general + d.character)} for m, d in decisions.items()}
    others = [m for m in decisions if m != model]
    lines = []
    for name in names:
        p = rows[model][name]
        theirs = [rows[o][name] for o in others if name in rows[o]]
        lines.append(
            TagLine(
                name,
                p,
                only=bool(others) and not any(name in chosen[o] for o in others),
                delta=(p - max(theirs)) if theirs else None,
                missing_in=tuple(o for o in others if name not in rows[o]),
            )
        )
    return sorted(lines, key=lambda line: -line.probability)


class TagPage:
    """The Tag tab's logic: models opened once, uploads tagged in batches, views for any settings (no gradio here)."""

    def __init__(self, device: str = "cpu", ema: bool = False, batch_size: int = 8) -> None:
        """An empty shelf of models."""
        self.device = device
        self.ema = ema
        self.batch_size = batch_size
        self.models: dict[str, OpenedModel] = {}
        self._lock = threading.Lock()

    def open(self, path: str | Path) -> OpenedModel:
        """Open a model once (the same folder again returns it); raises MODEL_ERRORS with a message for a bad folder."""
        text = str(path).strip()
        if not text:
            raise ValueError("no model path given")
        resolved = resolve_model_path(text)
        key = str(resolved.resolve())
        with self._lock:
            for opened in self.models.values():
                if opened.key == key:
                    return opened
            model = open_model(resolved, self.device, ema=self.ema)
            name = self._name_for(Path(text), model)
            opened = OpenedModel(name, text, model, model_thresholds(model), key)
            self.models[name] = opened
            return opened

    def _name_for(self, path: Path, model: TaggingModel) -> str:
        """A short unique display name: the folder's name, with the run's name for a checkpoint."""
        source = Path(model.source)
        base = f"{source.parent.parent.name}/{source.name}" if model.kind == "checkpoint" else (path.resolve().name or str(path))
        name, n = base, 2
        while name in self.models:
            name, n = f"{base} ({n})", n + 1
        return name

    def tag(self, paths: Sequence[str], model_names: Sequence[str], previous: Tagged | None = None) -> Tagged:
        """Decode every file with each model's preprocessing and run the models in batches; unreadable files are named."""
        paths = [str(p) for p in paths]
        if previous is not None and previous.paths == paths:
            tagged = previous  # the same files: only the models not run yet are run
        else:
            tagged = Tagged(paths, [Path(p).name for p in paths], [_thumbnail(p) for p in paths], {})
        for name in model_names:
            if name in tagged.probs:
                continue
            opened = self.models[name]
            size = opened.model.preprocess.image_size
            rows, images = [], []
            for i, path in enumerate(paths):
                if i in tagged.errors:
                    continue
                image, error = read_image(path, opened.model.preprocess)
                if image is None:
                    # the upload's server-side path means nothing to the user: name the file as uploaded
                    tagged.errors[i] = (error or "unreadable").replace(str(path), tagged.names[i])
                    continue
                rows.append(i)
                images.append(image)
            batch = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)  # (N_ok, S, S, 3)
            with opened.lock:
                probs = predict(opened.model, batch, self.batch_size)  # (N_ok, 4 + T)
            tagged.probs[name] = dict(zip(rows, probs))
        return tagged

    def views(
        self, tagged: Tagged, settings: dict[str, Thresholds], options: CaptionOptions, commands: dict[str, str] | None = None
    ) -> list[ImageView]:
        """What the page shows for each file: per model its rating, chosen tags (compared across models) and caption."""
        models = [m for m in settings if m in tagged.probs]
        views = []
        for i, name in enumerate(tagged.names):
            if i in tagged.errors:
                views.append(ImageView(name, tagged.thumbnails[i], error=tagged.errors[i]))
                continue
            decisions = {m: settings[m].decide(tagged.probs[m][i], self.models[m].model.labels) for m in models}
            rows = {m: dict(zip(self.models[m].model.labels.names, map(float, tagged.probs[m][i]))) for m in models}
            model_views = []
            for m in models:
                d = decisions[m]
                model_views.append(
                    ModelView(
                        m,
                        sorted(d.ratings.items(), key=lambda kv: -kv[1]),
                        _tag_lines(m, [n for n, _ in d.character], decisions, rows),
                        _tag_lines(m, [n for n, _ in d.general], decisions, rows),
                        options.separator.join(caption_tags(d, options)),
                        (commands or {}).get(m, ""),
                    )
                )
            views.append(ImageView(name, tagged.thumbnails[i], models=model_views))
        return views

    def command(self, name: str, settings: dict[str, Any], options: CaptionOptions) -> str:
        """The tag_images.py command line that writes the page's caption for these settings."""
        opened = self.models[name]
        args = ["python", "tag_images.py", "--model", opened.path, "--input", "DIR"]
        if settings["per_tag"] and opened.thresholds_file is not None:
            args += ["--thresholds", str(opened.thresholds_file)]
        else:
            args += ["--general-threshold", f"{settings['general']:g}", "--character-threshold", f"{settings['character']:g}"]
        args += ["--general-mcut"] * bool(settings["general_mcut"]) + ["--character-mcut"] * bool(settings["character_mcut"])
        flags = ("--remove-underscore", "--escape-parentheses", "--character-first", "--rating")
        values = (options.remove_underscore, options.escape_parentheses, options.character_first, options.rating)
        args += [flag for flag, on in zip(flags, values) if on]
        if options.undesired:
            args += ["--undesired-tags", ",".join(sorted(options.undesired))]
        return shlex.join(args)


def caption_options(remove_underscore: bool, escape_parentheses: bool, character_first: bool, rating: bool, undesired: str) -> CaptionOptions:
    """CaptionOptions from the page's caption controls (undesired tags comma-separated, as tag_images.py takes them)."""
    return CaptionOptions(
        remove_underscore, escape_parentheses, character_first, rating, frozenset(t.strip() for t in undesired.split(",") if t.strip())
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass
class ValidationData:
    """One checkpoint's evaluation for the Validation tab: predictions, per-tag rows and headline metrics."""

    name: str
    folder: Path  # where the reports and predictions are kept
    predictions: Predictions
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    computed: bool  # True when this start evaluated, False when it read the kept predictions

    def filtered_rows(self, search: str = "", category: str = "all", sort: str = "AP, worst first") -> list[dict[str, Any]]:
        """The table's rows: tag names containing `search`, of one category (or all), in the chosen order (nan last)."""
        key, descending = SORTS.get(sort, SORTS["AP, worst first"])
        needle = search.strip().lower()
        rows = [r for r in self.rows if needle in r["tag"].lower() and (category in ("all", "") or r["category"] == category)]
        if key == "tag":
            return sorted(rows, key=lambda r: r["tag"])
        numeric = [r for r in rows if r[key] == r[key]]  # nan != nan
        return sorted(numeric, key=lambda r: r[key], reverse=descending) + [r for r in rows if r[key] != r[key]]

    def worst(self, tag: str, count: int = 8) -> tuple[list[WorstImage], list[WorstImage]]:
        """The tag's highest-scored false positives and lowest-scored false negatives at the evaluation's threshold."""
        p = self.predictions
        j = p.tags.index(tag)
        scores, labels = p.probs[:, j], p.targets[:, j]
        predicted = scores >= p.threshold
        fp = np.flatnonzero(predicted & ~labels)
        fn = np.flatnonzero(~predicted & labels)
        fp = fp[np.argsort(-scores[fp], kind="stable")][:count]
        fn = fn[np.argsort(scores[fn], kind="stable")][:count]

        def item(i: int, kind: str) -> WorstImage:
            true = [p.tags[k] for k in np.flatnonzero(p.targets[i])]
            guessed = [p.tags[k] for k in np.flatnonzero(p.probs[i] >= p.threshold)]
            return WorstImage(p.paths[i], kind, float(scores[i]), true, guessed)

        return [item(int(i), "fp") for i in fp], [item(int(i), "fn") for i in fn]

    def curve(self, tag: str) -> str:
        """The tag's precision-recall curve (SVG), the evaluation's threshold marked."""
        p = self.predictions
        j = p.tags.index(tag)
        if not p.targets[:, j].any():
            return f"<div>{tag!r} has no positive validation image: no precision-recall curve.</div>"
        recall, precision, cuts = precision_recall_points(p.probs[:, j], p.targets[:, j])
        at = None
        kept = np.flatnonzero(cuts >= p.threshold)
        if kept.size:
            k = int(kept[-1])
            at = (float(recall[k]), float(precision[k]))
        return pr_curve_svg(recall, precision, tag, p.threshold, at)


def prepare_validation(
    path: str | Path, *, data: str | None = None, eval_dir: str | Path | None = None, device: str = "cpu", ema: bool = False, num_workers: int = -1
) -> ValidationData:
    """A model's evaluation for the page (a checkpoint: its run's validation split or --data; a release or export
    folder: --data): read from <eval dir>/predictions.npz when it is for this model and data, else run once and kept there."""
    folder, has_run = model_folder(path)
    out = Path(eval_dir) if eval_dir else model_eval_dir(folder, has_run)
    if is_inside(out, folder):
        raise ValueError(f"--eval-dir {out} is inside the model folder {folder}; the page never writes into a model folder: choose another folder")
    if not has_run and data is None:
        raise ValueError(f"{folder} has no run config (no dataset, no split): name the images to evaluate (--data)")
    target = out / PREDICTIONS_FILE
    predictions, computed = None, False
    if target.is_file():
        kept = load_predictions(target)
        same_data = (kept.data == "") if data is None else (kept.data != "" and Path(kept.data).resolve() == Path(data).resolve())
        # a model folder can be exported again under the same name: its evaluation is kept only while it is the newer
        fresh = has_run or target.stat().st_mtime >= max(p.stat().st_mtime for p in folder.iterdir() if p.is_file())
        if kept.checkpoint == str(folder) and kept.ema == ema and same_data and fresh:
            predictions = kept
    if predictions is None:
        ck = load_model_for_eval(folder, torch.device(device), ema=ema)
        if num_workers >= 0:
            ck.cfg.data.num_workers = num_workers
        check_out_location(out, data or ck.cfg.data.root or None)
        bundle = prepare_eval_data(ck.cfg, ck.vocab, ck.preprocess, data_root=data, log=print)
        evaluation = run_evaluation(
            ck, bundle, torch.device(device), threshold=ck.cfg.validation.threshold, ema=ema, data_root=data, keep_predictions=True
        )
        predictions = evaluation.predictions
        if predictions is None:  # keep_predictions=True always records them
            raise RuntimeError("run_evaluation kept no predictions")
        write_reports(out, evaluation.metrics, evaluation.result, ck.vocab, str(ck.folder))
        save_predictions(target, predictions)
        computed = True
    result = result_from_predictions(predictions)
    rows = per_tag_rows(result, predictions.vocabulary())
    name = f"{folder.parent.parent.name}/{folder.name}" if has_run else folder.name
    return ValidationData(name, out, predictions, rows, result.metrics, computed)


def gallery_items(items: Sequence[WorstImage]) -> list[tuple[np.ndarray, str]]:
    """(image, caption) pairs for a gallery; an image that no longer reads is left out."""
    out = []
    for item in items:
        image, _ = read_image(item.path, GALLERY)
        if image is not None:
            out.append(
                (
                    image,
                    f"{item.kind.upper()} p={item.probability:.3f} · true: {', '.join(item.true_tags)} · predicted: {', '.join(item.predicted_tags)}",
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _settings_dict(general: float, character: float, general_mcut: bool, character_mcut: bool, per_tag: bool) -> dict[str, Any]:
    return {
        "general": float(general),
        "character": float(character),
        "general_mcut": bool(general_mcut),
        "character_mcut": bool(character_mcut),
        "per_tag": bool(per_tag),
    }


def render_tag_tab(page: TagPage, tagged: Tagged | None, chosen: Sequence[str], settings: dict[str, dict[str, Any]], options: CaptionOptions) -> str:
    """The Tag tab's results for the chosen models with their settings."""
    if tagged is None:
        return tag_results_html([])
    models = [m for m in chosen if m in page.models and m in tagged.probs]
    thresholds, commands = {}, {}
    for m in models:
        s = settings.get(m) or page.models[m].default_settings()
        thresholds[m] = page.models[m].thresholds(s["general"], s["character"], s["general_mcut"], s["character_mcut"], s["per_tag"])
        commands[m] = page.command(m, s, options)
    return tag_results_html(page.views(tagged, thresholds, options, commands))


def _file_paths(files: Any) -> list[str]:
    """Paths of gradio's uploaded files (strings or objects with .name)."""
    if not files:
        return []
    return [str(getattr(f, "name", f)) for f in (files if isinstance(files, list) else [files])]


def import_gradio() -> Any:
    """gradio, with its usage analytics off before it is imported (no usage data leaves the machine); ImportError says what to install."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as exc:
        raise ImportError(f"tag_app.py needs gradio ({exc}): pip install -r requirements-app.txt") from None
    return gradio


def build_app(page: TagPage, validations: Sequence[ValidationData], notes: Sequence[str] = ()) -> gr.Blocks:
    """The gradio page: a Tag tab and, when a checkpoint's evaluation is at hand, a Validation tab."""
    gr = import_gradio()
    names = list(page.models)
    with gr.Blocks(title="OppaiOracle tagger", analytics_enabled=False) as app:
        gr.Markdown("## OppaiOracle tagger\n" + "\n".join(f"- {note}" for note in notes))
        with gr.Tab("Tag"):
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    chosen = gr.CheckboxGroup(names, value=names, label="Models", elem_id="models")
                    open_path = gr.Textbox(label="Open another model (export, timm-layout folder, run folder or checkpoint)", elem_id="open-path")
                    open_button = gr.Button("Open", elem_id="open-button")
                    target = gr.Dropdown(names, value=names[0] if names else None, label="Thresholds of", elem_id="target")
                    first = (
                        page.models[names[0]].default_settings()
                        if names
                        else _settings_dict(DEFAULT_GENERAL_THRESHOLD, DEFAULT_CHARACTER_THRESHOLD, False, False, False)
                    )
                    general = gr.Slider(
                        0, 1, value=first["general"], step=0.01, label="general threshold", elem_id="general", interactive=not first["per_tag"]
                    )
                    character = gr.Slider(
                        0, 1, value=first["character"], step=0.01, label="character threshold", elem_id="character", interactive=not first["per_tag"]
                    )
                    general_mcut = gr.Checkbox(first["general_mcut"], label="general: MCut", elem_id="general-mcut")
                    character_mcut = gr.Checkbox(first["character_mcut"], label="character: MCut (never below 0.15)", elem_id="character-mcut")
                    per_tag = gr.Checkbox(
                        first["per_tag"], label="per-tag thresholds from the model's thresholds.json (its category values apply)", elem_id="per-tag"
                    )
                    with gr.Accordion("Caption", open=False):
                        remove_underscore = gr.Checkbox(False, label="remove underscores")
                        escape = gr.Checkbox(False, label="escape parentheses")
                        character_first = gr.Checkbox(False, label="characters first")
                        rating = gr.Checkbox(False, label="rating tag first")
                        undesired = gr.Textbox("", label="undesired tags (comma-separated)")
                with gr.Column(scale=3):
                    files = gr.File(file_count="multiple", type="filepath", label="Images", elem_id="upload", height=140)
                    message = gr.Markdown("", elem_id="message")
                    results = gr.HTML(tag_results_html([]), elem_id="results")
            tagged_state = gr.State(None)
            settings_state = gr.State({n: page.models[n].default_settings() for n in names})
            caption_inputs = [remove_underscore, escape, character_first, rating, undesired]
            threshold_inputs = [general, character, general_mcut, character_mcut, per_tag]

            def on_files(file_list: Any, models: list[str], settings: dict, tagged: Tagged | None, *caption: Any) -> tuple[Any, str, str]:
                paths = _file_paths(file_list)
                if not paths:
                    return None, tag_results_html([]), ""
                tagged = page.tag(paths, [m for m in models if m in page.models], tagged)
                failed = [f"**{tagged.names[i]}**: not tagged ({tagged.errors[i]})" for i in sorted(tagged.errors)]
                note = f"{len(paths) - len(failed)} of {len(paths)} files tagged." + ("\n\n" + "\n\n".join(failed) if failed else "")
                return tagged, render_tag_tab(page, tagged, models, settings, caption_options(*caption)), note

            def on_settings(name: str, settings: dict, tagged: Tagged | None, models: list[str], *values: Any) -> tuple[dict, str]:
                settings = dict(settings)
                if name in page.models:
                    settings[name] = _settings_dict(*values[:5])
                return settings, render_tag_tab(page, tagged, models, settings, caption_options(*values[5:]))

            def on_target(name: str, settings: dict) -> list[Any]:
                s = settings.get(name) or (page.models[name].default_settings() if name in page.models else first)
                return [s["general"], s["character"], s["general_mcut"], s["character_mcut"], s["per_tag"]]

            def on_per_tag(name: str, on: bool) -> tuple[Any, Any]:
                opened = page.models.get(name)
                if opened is None or not (on and opened.thresholds_file):
                    return gr.update(interactive=True), gr.update(interactive=True)
                t = opened.thresholds(DEFAULT_GENERAL_THRESHOLD, DEFAULT_CHARACTER_THRESHOLD, False, False, True)
                return gr.update(value=t.general, interactive=False), gr.update(value=t.character, interactive=False)

            def on_open(path: str, models: list[str], settings: dict) -> tuple[Any, Any, dict, str]:
                try:
                    opened = page.open(path)
                except MODEL_ERRORS as exc:
                    return gr.update(), gr.update(), settings, f"**Could not open {path!r}**: {exc}"
                settings = {**settings, opened.name: settings.get(opened.name) or opened.default_settings()}
                every = list(page.models)
                chosen_now = list(dict.fromkeys([*models, opened.name]))
                return (
                    gr.update(choices=every, value=chosen_now),
                    gr.update(choices=every, value=opened.name),
                    settings,
                    f"Opened **{opened.name}** ({opened.model.kind}).",
                )

            files.change(on_files, [files, chosen, settings_state, tagged_state, *caption_inputs], [tagged_state, results, message])
            chosen.change(on_files, [files, chosen, settings_state, tagged_state, *caption_inputs], [tagged_state, results, message])
            for widget in (*threshold_inputs, *caption_inputs):
                widget.change(
                    on_settings, [target, settings_state, tagged_state, chosen, *threshold_inputs, *caption_inputs], [settings_state, results]
                )
            per_tag.change(on_per_tag, [target, per_tag], [general, character])
            target.change(on_target, [target, settings_state], threshold_inputs)
            open_button.click(on_open, [open_path, chosen, settings_state], [chosen, target, settings_state, message])

        if validations:
            _validation_tab(gr, validations)
    return app


def _validation_tab(gr: Any, validations: Sequence[ValidationData]) -> None:
    """The Validation tab: per-tag table, a tag's precision-recall curve and its worst images."""
    by_name = {v.name: v for v in validations}
    first = validations[0]

    def summary(v: ValidationData) -> str:
        m = v.metrics
        where = "evaluated now" if v.computed else "read from the kept predictions"
        return (
            f"**{v.name}**: mAP {m.get('mAP', float('nan')):.4f} · F1 micro {m.get('f1_micro', float('nan')):.4f} · "
            f"{v.predictions.probs.shape[0]} images · threshold {v.predictions.threshold:.3f} · {where} ({display_path(v.folder)})"
        )

    def categories(v: ValidationData) -> list[str]:
        return ["all", *sorted({r["category"] for r in v.rows})]

    with gr.Tab("Validation"):
        run = gr.Dropdown(list(by_name), value=first.name, label="Evaluation", elem_id="val-run")
        head = gr.Markdown(summary(first), elem_id="val-summary")
        with gr.Row():
            search = gr.Textbox("", label="search tags", elem_id="val-search")
            category = gr.Dropdown(categories(first), value="all", label="category", elem_id="val-category")
            order = gr.Dropdown(list(SORTS), value="AP, worst first", label="sort", elem_id="val-sort")
        table = gr.HTML(tag_table_html(first.filtered_rows(), first.predictions.threshold), elem_id="val-table")
        tag = gr.Dropdown([r["tag"] for r in first.filtered_rows()], value=None, label="tag", elem_id="val-tag")
        with gr.Row():
            curve = gr.HTML("", elem_id="val-curve")
            worst = gr.HTML("", elem_id="val-worst")
        with gr.Row():
            fp_gallery = gr.Gallery(label="highest-scored false positives", columns=4, elem_id="val-fp")
            fn_gallery = gr.Gallery(label="lowest-scored false negatives", columns=4, elem_id="val-fn")

        def on_filter(name: str, text: str, cat: str, sort: str) -> tuple[str, Any]:
            v = by_name[name]
            rows = v.filtered_rows(text, cat, sort)
            return tag_table_html(rows, v.predictions.threshold), gr.update(choices=[r["tag"] for r in rows])

        def on_run(name: str) -> tuple[str, Any]:
            v = by_name[name]
            return summary(v), gr.update(choices=categories(v), value="all")

        def on_tag(name: str, chosen: str | None) -> tuple[str, str, Any, Any]:
            v = by_name[name]
            if not chosen or chosen not in v.predictions.tags:
                return "", "", [], []
            fps, fns = v.worst(chosen)
            return v.curve(chosen), worst_images_html([*fps, *fns], chosen, v.predictions.threshold), gallery_items(fps), gallery_items(fns)

        for widget in (search, category, order):
            widget.change(on_filter, [run, search, category, order], [table, tag])
        run.change(on_run, [run], [head, category]).then(on_filter, [run, search, category, order], [table, tag])
        tag.change(on_tag, [run, tag], [curve, worst, fp_gallery, fn_gallery])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description="A local page to try taggers side by side and see where a run is wrong.")
    p.add_argument("models", nargs="+", help="export folder, timm-layout folder, run folder or checkpoint (one or more)")
    p.add_argument(
        "--data",
        default=None,
        help="Validation tab: evaluate every sample of this dataset folder or sharded dataset (a model folder needs it; a run uses its validation split)",
    )
    p.add_argument("--eval-dir", default=None, help="Validation tab: where the evaluation is kept (default <run>/eval/<step>; one model only)")
    p.add_argument("--no-validation", action="store_true", help="no Validation tab (no evaluation at start)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off unless asked)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--ema", action="store_true", help="checkpoints: use the EMA weights")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call")
    p.add_argument("--num-workers", type=int, default=-1, help="Validation: image-loading workers (default: the run's data.num_workers)")
    p.add_argument("--max-upload-mb", type=int, default=64, help="largest file the page accepts")
    args = p.parse_args(argv)
    if args.batch_size < 1 or not 0 < args.port < 65536 or args.max_upload_mb < 1:
        p.error("--batch-size and --max-upload-mb must be >= 1 and --port in 1..65535")
    if args.eval_dir and len(args.models) > 1:
        p.error("--eval-dir names one evaluation: give one model with it")
    return args


def setup(args: argparse.Namespace) -> tuple[TagPage, list[ValidationData], list[str]]:
    """Open the models and their evaluations once; a model that fails is a note on the page, not an exit."""
    page = TagPage(args.device, args.ema, args.batch_size)
    validations: list[ValidationData] = []
    notes: list[str] = []
    for path in args.models:
        try:
            opened = page.open(path)
        except MODEL_ERRORS as exc:
            notes.append(f"could not open {path}: {exc}")
            print(f"error: could not open {path}: {exc}", file=sys.stderr)
            continue
        if not args.no_validation and opened.model.kind != "checkpoint" and not args.data:
            notes.append(f"no validation for {opened.name}: a model folder has no validation split of its own (name a dataset with --data)")
        elif not args.no_validation:
            try:
                validation = prepare_validation(
                    path, data=args.data, eval_dir=args.eval_dir, device=args.device, ema=args.ema, num_workers=args.num_workers
                )
            except MODEL_ERRORS as exc:
                notes.append(f"no validation for {opened.name}: {exc}")
                print(f"error: no validation for {opened.name}: {exc}", file=sys.stderr)
            else:
                validations.append(validation)
                if opened.thresholds_file is None and (validation.folder / THRESHOLDS_FILE).is_file():  # the evaluation's tuned ones
                    opened.thresholds_file = validation.folder / THRESHOLDS_FILE
        source = display_path(opened.thresholds_file) if opened.thresholds_file else "the defaults 0.35 / 0.85"
        notes.append(f"**{opened.name}**: {opened.model.kind} ({path}), thresholds from {source}")
    return page, validations, notes


def main(argv: list[str] | None = None) -> int:
    """Open the models, evaluate once where needed, serve the page until interrupted."""
    args = parse_args(argv)
    try:
        gr = import_gradio()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    page, validations, notes = setup(args)
    app = build_app(page, validations, notes)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts fetched
    print(f"tag_app: {len(page.models)} model(s), {len(validations)} evaluation(s); http://{args.host}:{args.port}", flush=True)
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=f"{args.max_upload_mb}mb",
        theme=theme,
        css=PAGE_CSS,
        ssr_mode=False,
        show_error=True,
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
