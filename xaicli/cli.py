"""`xai` command line: parse flags, build a RunConfig, call the engine wirings, map errors to exit codes.

No logic lives here beyond that.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import MISSING
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._version import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, XaiError

EXIT_CODES_HELP = (
    "Exit codes: 0 all done; 1 done, some images failed (see OUT/errors.csv); "
    "2 usage or config error; 3 output folder locked by another run; 4 internal or I/O error; 130 interrupted."
)

app = typer.Typer(
    name="xai",
    help="Batch explanations for image classifiers: heatmaps for whole folders, and faithfulness "
    "metrics for what they show.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True, soft_wrap=True)  # one line per message, also in cron logs


def _flags_without_metavar() -> None:
    """Typer's rich help shows a flag as `--quiet <bool>`, as if it took a value; a flag takes none."""
    opt = getattr(typer.core, "TyperOption", None)
    orig = getattr(opt, "display_type_rich", None)
    if orig is None or getattr(orig, "_xai", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else orig(self, ctx)

    display_type_rich._xai = True
    opt.display_type_rich = display_type_rich


_flags_without_metavar()


def _complete_names(registry: str):
    """Shell completion of comma-separated method/metric names (the part after the last comma)."""

    def complete(incomplete: str) -> list[str]:
        head, _, last = incomplete.rpartition(",")
        if registry == "methods":
            from .methods import METHODS as names
        else:
            from .metrics import METRICS as names
        prefix = head + "," if head else ""
        return [prefix + n for n in sorted(names) if n.startswith(last)]

    return complete


def _version(value: bool):
    if value:
        typer.echo(f"xai {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass


@app.command(epilog=EXIT_CODES_HELP)
def explain(
    inputs: list[str] | None = typer.Argument(
        None,
        help="Folders (searched recursively), glob patterns ('imgs/**/*.jpg'), image files or .txt lists of "
        "paths; several may be given (an unquoted glob the shell expanded works).",
        show_default=False,
    ),
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        help="Method(s), comma-separated, each with optional parameters: "
        "gradcam,integrated_gradients:n_steps=32,baseline=blur (default gradcam). See `xai methods`.",
        autocompletion=_complete_names("methods"),
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default ./xai-out)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run config; flags override its values."),
    model: str | None = typer.Option(
        None, help="default | torchvision:NAME | timm:NAME | my_pkg.module:build | file.py:build (see `xai models`)."
    ),
    weights: str | None = typer.Option(
        None, help="default | none | a weights name/tag | a local .safetensors/.pt/.pth checkpoint."
    ),
    layer: str | None = typer.Option(None, help="Target layer for CAM methods (found automatically if omitted)."),
    target: str | None = typer.Option(
        None,
        help="'predicted' (default), a class index, a class name ('tiger cat'), or a labels CSV with columns "
        "image,class.",
    ),
    device: str | None = typer.Option(None, help="auto (default), cpu, cuda, cuda:N."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Images per batch (default 8)."),
    workers: int | None = typer.Option(None, help="DataLoader decode workers (default 2)."),
    colormap: str | None = typer.Option(None, help="Matplotlib colormap for the overlays (default jet)."),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        help="Also compute metrics in the batch loop, comma-separated (e.g. deletion,insertion,avg-drop; "
        "parameters as for -m: deletion:step=0.05); writes OUT/metrics.csv, metrics_summary.csv and curve PNGs. "
        "See `xai metrics`.",
        autocompletion=_complete_names("metrics"),
    ),
    against: str | None = typer.Option(None, "--against", help="Method the `win` metric compares with."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="Bounding boxes (CSV, JSON or Pascal VOC XML) for the localization metrics."
    ),
    concepts: str | None = typer.Option(
        None,
        "--concepts",
        help="For -m concept_maps: the OUT/concepts/ folder of `xai concepts extract` (its fitted concepts).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Redo every image (and replace the outputs of a different config)."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="If another run holds the output folder, wait for it (else exit 3)."
    ),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Rebuild a damaged output folder's state: damaged state files go to OUT/.xai-damaged/, whole "
        "CSV rows are kept, finished maps are not recomputed (see the README's cron section).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be done; write nothing."),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Process at most N images (of those not up to date)."
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="I/N: only the images of shard I of N (deterministic by name; one --out per shard)."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar or summary (for cron); errors still go to stderr."
    ),
    sheet: bool = typer.Option(
        False, "--sheet", help="Also write comparison sheets OUT/sheets/<image>.png (= `sheet: true`)."
    ),
    report: bool = typer.Option(False, "--report", help="Write the HTML report OUT/report/index.html at the end."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the run summary as one JSON object on stdout (no tables, no progress bar)."
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", min=1, help="Classes of the model's head (a checkpoint trained on your classes)."
    ),
    class_names: Path | None = typer.Option(None, "--class-names", help="Text file, one class name per line."),
    input_size: str | None = typer.Option(
        None, "--input-size", help="Model input size: N or HxW (default: the model's own)."
    ),
    resize: int | None = typer.Option(None, "--resize", min=1, help="Shorter side before the centre crop."),
    crop: str | None = typer.Option(None, "--crop", help="center (default) | none (resize to the input size)."),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean, three numbers: 0.485,0.456,0.406."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std, three numbers: 0.229,0.224,0.225."),
    interpolation: str | None = typer.Option(
        None, "--interpolation", help="bilinear | bicubic | nearest | lanczos (default: the model's own)."
    ),
    overlay_format: str | None = typer.Option(
        None, "--overlay-format", help="Overlay files: png (default, fast zlib level), jpg or webp."
    ),
    overlay_max_side: int | None = typer.Option(
        None,
        "--overlay-max-side",
        min=16,
        help="Draw overlays with their longer side at most N pixels (default: the original size); "
        "lets JPEGs be decoded at a reduced size (much faster on multi-megapixel photos).",
    ),
    save_maps: str | None = typer.Option(
        None, "--save-maps", help="Raw maps: npy (float32, default), npz-f16 (float16, ~4x smaller) or false."
    ),
    amp: str | None = typer.Option(None, "--amp", help="bf16: autocast forward/backward to bfloat16 (default none)."),
    channels_last: bool = typer.Option(
        False, "--channels-last", help="Model and batches in channels_last memory format (= `channels_last: true`)."
    ),
    fold_bn: bool | None = typer.Option(
        None,
        "--fold-bn/--no-fold-bn",
        help="Run the methods on a copy of the model with each eval BatchNorm folded into its conv "
        "(default on; checked against the model's logits, else not used). = `fold_bn: true|false`.",
    ),
    engine: str | None = typer.Option(
        None,
        "--engine",
        help="local (default) or ray: run the batches on a Ray Data actor pool (pip install 'xaicli[ray]').",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --engine ray: the cluster to join (e.g. ray://head:10001 or auto)."
    ),
):
    """Explain every image of a folder: heatmap PNGs, raw .npy maps and explanations.csv.

    Examples:\n
      xai explain --method gradcam imgs/ --out out/\n
      xai explain --config configs/nightly.yaml
    """
    from .config import build_config
    from .explain_run import RunOptions, run_explain
    from .progress import RichProgress

    overrides = _run_overrides(inputs, method, out, model, weights, layer, target, device) | {
        "batch_size": batch_size,
        "workers": workers,
        "colormap": colormap,
        "metrics": metrics,
        "against": against,
        "annotations": str(annotations) if annotations else None,
        "sheet": True if sheet else None,
        "concepts": concepts,  # after "methods": sets the concept_maps methods' `concepts`
        "model.num_classes": num_classes,
        "model.class_names": str(class_names) if class_names else None,
        "model.input_size": input_size,
        "model.resize": resize,
        "model.crop": crop,
        "model.mean": mean,
        "model.std": std,
        "model.interpolation": interpolation,
        "overlay_format": overlay_format,
        "overlay_max_side": overlay_max_side,
        "save_maps": save_maps,
        "amp": amp,
        "channels_last": True if channels_last else None,
        "fold_bn": fold_bn,
        "engine": engine,
        "ray_address": ray_address,
    }
    cfg = build_config(config, overrides)
    progress = None if quiet or as_json else RichProgress(err_console)
    options = RunOptions(force=force, wait=wait, dry_run=dry_run, limit=limit, shard=shard, repair=repair)
    with interruptible():
        summary = run_explain(
            cfg,
            progress=progress,
            options=options,
            on_wait=lambda holder: err_console.print(f"waiting for the run that holds {cfg.output} ({holder})"),
        )
    if dry_run:  # the preflight of `xai check`, then the list of images
        from .preflight import preflight

        rep = preflight(cfg, force=force, limit=limit, shard=shard)
        code = 2 if rep.errors else 0  # warnings (e.g. over the budget) are printed, not an exit code here
        if as_json:
            _print_json(
                {
                    **rep.to_json(),
                    "command": "explain",
                    "dry_run": True,
                    "images": summary.total,
                    "up_to_date": summary.skipped,
                    "todo": [str(it.path) for it in summary.planned],
                    "exit_code": code,
                }
            )
        else:
            _print_check(rep)
            _print_plan(summary)
        raise typer.Exit(code)
    rep = _write_report(summary.out) if report else None
    if as_json:
        _print_json(_explain_json(summary, rep))
    elif not quiet:
        _print_summary(summary)
        if summary.metrics is not None:
            _print_metrics(summary.metrics)
    if summary.failed:
        err_console.print(f"[yellow]{summary.failed} image(s) failed; see {summary.out / 'errors.csv'}[/]")
    if summary.flagged:
        err_console.print(
            f"[yellow]{summary.flagged} map(s) flagged nonfinite/oom (not drawn); see the status column of "
            f"{summary.out / 'explanations.csv'}[/]"
        )
    raise typer.Exit(summary.exit_code)


@app.command(
    epilog=EXIT_CODES_HELP.replace("1 done, some images failed (see OUT/errors.csv)", "1 warnings (see above)")
)
def check(
    inputs: list[str] | None = typer.Argument(
        None,
        help="Folders, glob patterns, image files or .txt lists of paths (as for `xai explain`).",
        show_default=False,
    ),
    method: str | None = typer.Option(
        None, "--method", "-m", help="Method(s) with optional parameters, as for `xai explain` (default gradcam)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default ./xai-out)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run config; flags override its values."),
    model: str | None = typer.Option(None, help="default | torchvision:NAME | timm:NAME (see `xai models`)."),
    weights: str | None = typer.Option(None, help="default | none | a weights name/tag | a local checkpoint."),
    layer: str | None = typer.Option(None, help="Target layer for CAM methods (found automatically if omitted)."),
    target: str | None = typer.Option(None, help="'predicted' (default), a class index, or a labels CSV."),
    device: str | None = typer.Option(None, help="auto (default), cpu, cuda, cuda:N."),
    metrics: str | None = typer.Option(None, "--metrics", help="Metrics the run computes, comma-separated."),
    annotations: Path | None = typer.Option(None, "--annotations", help="Bounding boxes for localization metrics."),
    force: bool = typer.Option(False, "--force", help="Plan as `xai explain --force` would (redo everything)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Plan at most N images."),
    shard: str | None = typer.Option(None, "--shard", help="I/N: plan shard I of N."),
    budget: float = typer.Option(
        8.0, "--budget", min=0.0, help="Hours: warn (exit 1) when the estimated run time exceeds it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
):
    """Preflight: check model, weights, layers, labels and the expected cost, without running.

    Builds the model and loads its weights (offline-aware: fails in seconds without network),
    binds every method on one dummy forward (layers resolved and checked), reads the labels and
    annotation files, and prints the plan: images to do and up to date, methods, and the expected
    cost (each method's cost in forwards/backwards per image x one measured forward/backward).
    Writes nothing. `xai explain --dry-run` prints the same, then the images.

    Examples:

      xai check --config configs/nightly.yaml

      xai check -m integrated_gradients:n_steps=256 imgs/ --budget 2
    """
    from .config import build_config
    from .preflight import preflight

    overrides = _run_overrides(inputs, method, out, model, weights, layer, target, device)
    overrides |= {"metrics": metrics, "annotations": str(annotations) if annotations else None}
    cfg = build_config(config, overrides)
    rep = preflight(cfg, force=force, limit=limit, shard=shard, budget_hours=budget)
    if as_json:
        _print_json(rep.to_json())
    else:
        _print_check(rep)
    raise typer.Exit(rep.exit_code)


def _print_check(rep) -> None:
    from .preflight import human_seconds

    console = Console(highlight=False)
    t = Table(title="xai check", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("output", str(rep.out) + (" (holds another config's outputs)" if rep.replaces_config else ""))
    t.add_row(
        "images",
        f"{rep.images} found, {rep.up_to_date} up to date, {rep.todo} to do"
        + (f", {rep.ignored} non-image file(s) ignored" if rep.ignored else ""),
    )
    t.add_row(
        "model",
        f"{rep.model} on {rep.device}: {rep.classes} classes, input {rep.input_size[0]}x{rep.input_size[1]}, "
        f"loaded in {rep.load_seconds:.1f} s",
    )
    t.add_row("measured", f"one image: forward {rep.forward_s * 1000:.1f} ms, backward {rep.backward_s * 1000:.1f} ms")
    for m in rep.methods:
        if m.error:
            t.add_row(f"  {m.key}", f"[red]error[/]: {escape(m.error)}")
            continue
        per = (
            f"{m.forwards:g} F + {m.backwards:g} B = {human_seconds(m.seconds_per_image)}/img"
            if m.seconds_per_image is not None
            else "cost unknown"
        )
        t.add_row(f"  {m.key}", escape(per + (f" (layer {m.layer})" if m.layer else "")))
    if rep.labels and "class" in rep.labels:
        t.add_row("target", escape(f"{rep.labels['class']} (class {rep.labels['index']})"))
    elif rep.labels:
        lb = rep.labels
        t.add_row(
            "labels", escape(f"{lb['file']}: {lb['listed']} listed, {lb['missing']} not (fallback: {lb['fallback']})")
        )
    if rep.annotations:
        an = rep.annotations
        t.add_row("annotations", escape(f"{an['file']}: boxes for {an['images_with_boxes']} of {an['images']} images"))
    if rep.metrics:
        t.add_row("metrics", ", ".join(rep.metrics) + " (not in the estimate)")
    t.add_row(
        "estimate",
        f"{human_seconds(rep.estimate_seconds)} for {rep.todo} image(s) "
        f"({human_seconds(rep.seconds_per_image)}/img; batch 1 timing, decoding and writing not included)",
    )
    console.print(t)
    for w in rep.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    for e in rep.errors:
        err_console.print(f"[bold red]error:[/] {escape(e)}", highlight=False)


def _run_overrides(inputs, method, out, model, weights, layer, target, device) -> dict:
    """The config overrides `xai explain` and `xai check` share (None = not given on the command line)."""
    return {
        "input": _inputs(inputs),
        "methods": method,
        "output": str(out) if out else None,
        "model.name": model,
        "model.weights": weights,
        "model.layer": layer,
        "target": target,
        "device": device,
    }


def _inputs(inputs: list[str] | None):
    """None, one input (a string: the config hash of one input is unchanged) or a list."""
    if not inputs:
        return None
    return inputs[0] if len(inputs) == 1 else list(inputs)


def _print_json(doc: dict) -> None:
    import json

    sys.stdout.write(json.dumps(doc, default=str, sort_keys=True) + "\n")
    sys.stdout.flush()


def _files(out: Path, rep) -> dict:
    names = (
        "explanations.csv",
        "errors.csv",
        "manifest.json",
        "run.yaml",
        "metrics.csv",
        "metrics_summary.csv",
        "metrics_summary_by_class.csv",
    )
    files = {n: str(out / n) for n in names if (out / n).is_file()}
    if (out / "sheets").is_dir():
        files["sheets"] = str(out / "sheets")
    if rep is not None:
        files["report"] = str(rep.index)
    return files


def _metrics_json(res) -> list[dict]:
    return [
        {
            "metric": r["metric"],
            "method": r["method"],
            "mean": float(r["mean"]),
            "std": float(r["std"]),
            "n": int(r["n"]),
            "better": res.directions.get(r["metric"], ""),
        }
        for r in res.rows
    ]


def _explain_json(s, rep) -> dict:
    from .reader import RunFolder

    doc = {
        "command": "explain",
        "status": RunFolder(s.out).manifest().get("status", "done"),
        "exit_code": s.exit_code,
        "out": str(s.out),
        "images": s.total,
        "done": s.done,
        "up_to_date": s.skipped,
        "failed": s.failed,
        "flagged": s.flagged,
        "ignored": s.ignored,
        "seconds": round(s.seconds, 3),
        "method_seconds": {k: round(v, 3) for k, v in s.method_seconds.items()},
        "metric_seconds": {k: round(v, 3) for k, v in s.metric_seconds.items()},
        "maps": [str(p) for p in s.maps],
        "files": _files(s.out, rep),
    }
    if getattr(s, "added", None) or getattr(s, "redrawn", 0) or getattr(s, "backfilled", None):
        doc["incremental"] = {"methods_added": s.added, "redrawn": s.redrawn, "metrics_added": list(s.backfilled)}
    if s.metrics is not None:
        doc["metrics"] = _metrics_json(s.metrics)
    return doc


def _write_report(out: Path):
    from .report import write_report

    return write_report(out)


def _print_plan(s) -> None:
    console = Console()
    console.print(
        f"dry run: {s.total} image(s) found, {s.skipped} up to date, {len(s.planned)} to do"
        + (f", {s.ignored} non-image file(s) ignored" if s.ignored else "")
    )
    for it in s.planned:
        console.print(f"  {it.path}", highlight=False, markup=False)


def _print_summary(s) -> None:
    from .progress import rate_text

    console = Console()
    t = Table(title="xai explain", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("images", str(s.total))
    if s.skipped:
        t.add_row("up to date", f"{s.skipped} (from an earlier run; --force redoes them)")
    t.add_row("done", str(s.done))
    if getattr(s, "added", None):
        t.add_row("new methods", ", ".join(s.added) + " (only these were computed for up-to-date images)")
    if getattr(s, "redrawn", 0):
        t.add_row("redrawn", f"{s.redrawn} PNG(s) from the stored maps (display settings changed)")
    if getattr(s, "backfilled", None):
        t.add_row("new metrics", ", ".join(s.backfilled) + " (scored on the stored maps)")
    t.add_row("failed", str(s.failed) + (" (see errors.csv)" if s.failed else ""))
    if s.flagged:
        t.add_row("flagged maps", f"{s.flagged} (nonfinite/oom, see explanations.csv status)")
    if s.ignored:
        t.add_row("ignored", f"{s.ignored} non-image file(s)")
    t.add_row("time", f"{s.seconds:.1f} s ({rate_text(s.images_per_second)})")
    for k, v in s.method_seconds.items():
        t.add_row(f"  {k}", f"{v:.2f} s on the device" + _per_image(v, s.done))
    for k, v in s.metric_seconds.items():
        t.add_row(f"  metric {k}", f"{v:.2f} s on the device" + _per_image(v, s.done))
    t.add_row("outputs", str(s.out.resolve()))
    for p in s.maps:
        t.add_row("map", str(p))
    console.print(t)


def _per_image(seconds: float, images: int) -> str:
    return f" ({seconds / images:.1f} s/img)" if images and seconds / images >= 1 else ""


EVALUATE_EXIT_HELP = (
    "Exit codes: 0 all done; 1 done, some images skipped (a map or the source image is missing or unreadable); "
    "2 usage or config error; 3 output folder locked by another run; 4 internal or I/O error; 130 interrupted."
)


@app.command(epilog=EVALUATE_EXIT_HELP)
def evaluate(
    out: Path | None = typer.Argument(
        None, help="Output folder of `xai explain` (default ./xai-out, or the `output` of --config)."
    ),
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="Metric(s), comma-separated (default: the config's `metrics:`, else deletion,insertion). See `xai metrics`.",
    ),
    against: str | None = typer.Option(None, "--against", help="Method of the run that `win` compares with."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config: its `output`, `metrics:` (with parameters) and `annotations`."
    ),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="Bounding boxes (CSV, JSON or Pascal VOC XML) for the localization metrics."
    ),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:N (default: the run's)."),
    wait: bool = typer.Option(
        False, "--wait", help="If another run holds the output folder, wait for it (else exit 3)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
    report: bool = typer.Option(False, "--report", help="Write the HTML report OUT/report/index.html at the end."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as one JSON object on stdout (no tables, no progress bar)."
    ),
):
    """Score the maps of an output folder: OUT/metrics.csv, metrics_summary.csv and curve PNGs.

    Reads only run.yaml, explanations.csv and OUT/<method>/<image>.npy (xaicli.reader.RunFolder);
    rebuilds the model from run.yaml and re-reads the images. Holds the folder's lock like explain.

    Examples:

      xai evaluate out/ --metric deletion,insertion

      xai evaluate out/ --metric win --against saliency
    """
    from .evaluate import run_evaluate
    from .progress import RichProgress

    with interruptible():
        res = run_evaluate(
            out,
            metric,
            against=against,
            config=config,
            annotations=annotations,
            device=device,
            progress=None if quiet or as_json else RichProgress(err_console, "evaluating"),
            wait=wait,
            on_wait=lambda holder: err_console.print(f"waiting for the run that holds the folder ({holder})"),
        )
    rep = _write_report(res.out) if report else None
    code = 1 if res.skipped else 0
    if as_json:
        _print_json(
            {
                "command": "evaluate",
                "exit_code": code,
                "out": str(res.out),
                "images": res.images,
                "skipped": res.skipped,
                "seconds": round(res.seconds, 3),
                "metrics": _metrics_json(res),
                "plots": [str(p) for p in res.plots],
                "files": _files(res.out, rep),
            }
        )
    elif not quiet:
        _print_metrics(res)
    if res.skipped:
        err_console.print(f"[yellow]{res.skipped} image(s) skipped (a map or the source image is missing)[/]")
    raise typer.Exit(code)


RENDER_EXIT_HELP = (
    "Exit codes: 0 all redrawn; 1 some maps left as they were (the .npy or the source image is missing or "
    "unreadable); 2 usage or config error; 3 output folder locked by another run; 4 internal or I/O error; "
    "130 interrupted."
)


@app.command("render", epilog=RENDER_EXIT_HELP)
def render_cmd(
    out: Path = typer.Argument(Path("xai-out"), help="Output folder of `xai explain` (default ./xai-out)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Take the display settings (colormap, alpha, overlay:) from this config."
    ),
    colormap: str | None = typer.Option(None, help="Matplotlib colormap for non-negative maps (e.g. viridis)."),
    alpha: float | None = typer.Option(None, min=0.0, max=1.0, help="Heatmap opacity, 0..1."),
    diverging: str | None = typer.Option(None, help="Colormap of signed maps, centred at zero (e.g. RdBu_r)."),
    clip_percentile: float | None = typer.Option(
        None, "--clip-percentile", help="Percentile clipping of gradient and signed maps (default 99.5)."
    ),
    caption: bool | None = typer.Option(
        None, "--caption/--no-caption", help="A strip below each overlay: method, class, probability."
    ),
    colorbar: bool | None = typer.Option(None, "--colorbar/--no-colorbar", help="A colorbar in that strip."),
    wait: bool = typer.Option(
        False, "--wait", help="If another run holds the output folder, wait for it (else exit 3)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
):
    """Redraw the overlay PNGs of an output folder from its stored .npy maps with other display
    settings: no model, nothing recomputed. run.yaml records the new settings, so `xai explain`
    with a config that has them resumes the folder.

    Examples:

      xai render out/ --colormap viridis --alpha 0.4

      xai render out/ --config configs/nightly.yaml
    """
    from .progress import RichProgress
    from .render import run_render

    flags = {
        "colormap": colormap,
        "alpha": alpha,
        "diverging": diverging,
        "clip_percentile": clip_percentile,
        "caption": caption,
        "colorbar": colorbar,
    }
    with interruptible():
        res = run_render(
            out,
            config,
            flags,
            wait=wait,
            progress=None if quiet else RichProgress(err_console, "rendering"),
            on_wait=lambda holder: err_console.print(f"waiting for the run that holds {out} ({holder})"),
        )
    if not quiet:
        Console().print(
            f"redrew {res.maps} map(s) of {res.images} image(s) in {res.seconds:.1f} s"
            + (f"; {res.missing} left as they were (map or source image unreadable)" if res.missing else "")
        )
    raise typer.Exit(1 if res.missing else 0)


@app.command("report")
def report_cmd(
    out: Path = typer.Argument(Path("xai-out"), help="Output folder of `xai explain` (default ./xai-out)."),
    sheets: bool = typer.Option(
        True,
        "--sheets/--no-sheets",
        help="Write the comparison sheets the detail view shows (once; kept while up to date).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
):
    """Write OUT/report/index.html: run header, image table (sort, filter, pages), detail view with
    the comparison sheet, metric summary with curves and per-class means, sanity plots, errors.

    No network needed: open it from the disk or serve OUT with any static web server.
    """
    from .report import write_report

    rep = write_report(out, sheets=sheets)
    if as_json:
        _print_json(
            {
                "command": "report",
                "exit_code": 0,
                "out": str(rep.out),
                "index": str(rep.index),
                "images": rep.images,
                "methods": rep.methods,
                "errors": rep.errors,
                "sheets_written": rep.sheets_written,
                "thumbs_written": rep.thumbs_written,
                "seconds": round(rep.seconds, 3),
            }
        )
    else:
        Console().print(
            f"report: {rep.index} ({rep.images} images, {len(rep.methods)} methods, {rep.errors} errors; "
            f"{rep.sheets_written} sheets and {rep.thumbs_written} thumbnails written)",
            highlight=False,
        )


concepts_app = typer.Typer(
    name="concepts",
    help="Global, concept-based explanations (docs/concepts.md). Both commands read a YAML config "
    "(configs/concepts.yaml) and write to OUT/concepts/.\n\n"
    "[bold]tcav[/]: does the model use a concept you give as example images (e.g. 'striped') to say "
    "a class? A linear CAV per (concept, layer, random set), TCAV scores, a t-test against "
    "random-vs-random CAVs, Bonferroni-corrected: tcav.csv, cavs.safetensors, tcav.png.\n\n"
    "[bold]extract[/]: which concepts drive one class, and where are they? Crops of its images, NMF of "
    "their activations into K concepts, each concept's importance (gradient x coefficient, or CRAFT's "
    "Sobol indices with `importance: sobol`): "
    "concepts.csv, atlas.png, concepts.safetensors, and K concept maps per image "
    "(OUT/concept_maps/, reusable with `xai explain -m concept_maps --concepts OUT/concepts/`).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(concepts_app)

CONCEPTS_CONFIG_HELP = "YAML config with a `tcav:` and/or `extract:` section (see configs/concepts.yaml)."


def _concept_progress(quiet: bool):
    from .progress import RichProgress

    return None if quiet else (lambda what: RichProgress(err_console, what))


@concepts_app.command("tcav", epilog=EXIT_CODES_HELP)
def concepts_tcav(
    config: Path = typer.Option(..., "--config", "-c", help=CONCEPTS_CONFIG_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (results in OUT/concepts/)."),
    device: str | None = typer.Option(None, help="auto (default), cpu, cuda, cuda:N."),
    wait: bool = typer.Option(False, "--wait", help="If another run holds OUT/concepts/, wait for it (else exit 3)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or table."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
):
    """TCAV: is a concept (example images) significant for a class at a layer?

    Trains a linear CAV per (concept, layer, random set) on the device, scores the share of the class's images whose logit grows along it, and tests the scores against random-vs-random CAVs (two-sided t-test, Bonferroni). Writes OUT/concepts/tcav.csv, tcav_runs.csv, cavs.safetensors, tcav.png; unreadable images go to OUT/concepts/errors.csv. Walkthrough: docs/concepts.md.

    Example: xai concepts tcav --config configs/concepts.yaml
    """
    from .concepts.config import build_concepts_config
    from .concepts.tcav import run_tcav

    cfg = build_concepts_config(config, {"output": str(out) if out else None, "device": device}, need="tcav")
    with interruptible():
        res = run_tcav(cfg, progress=None if as_json else _concept_progress(quiet), wait=wait)
    code = 1 if res.failed else 0
    if as_json:
        _print_json({"command": "concepts tcav", "exit_code": code, "out": str(res.out), "failed": res.failed,
                     "seconds": round(res.seconds, 3), "rows": res.rows, "files": {k: str(v) for k, v in res.files.items()}})  # fmt: skip
    elif not quiet:
        t = Table(title=f"TCAV ({res.out / 'tcav.csv'})", title_justify="left")
        for col in ("concept", "layer", "class", "score", "random", "p (Bonferroni)", "significant", "CAV acc."):
            t.add_column(col, justify="left" if col in ("concept", "layer", "class") else "right")
        for r in res.rows:
            t.add_row(r["concept"], r["layer"], f"{r['class']} {r['class_label']}",
                      f"{float(r['score_mean']):.2f} ± {float(r['score_std']):.2f}",
                      f"{float(r['random_mean']):.2f} ± {float(r['random_std']):.2f}", f"{float(r['p_bonferroni']):.3g}",
                      "yes" if r["significant"] == "true" else "[yellow]no[/]", f"{float(r['cav_accuracy']):.2f}")  # fmt: skip
        Console().print(t)
        Console().print(f"chart: {res.files['chart']}", highlight=False)
    if res.failed:
        err_console.print(f"[yellow]{res.failed} image(s) could not be read; see {res.out / 'errors.csv'}[/]")
    raise typer.Exit(code)


@concepts_app.command("extract", epilog=EXIT_CODES_HELP)
def concepts_extract(
    config: Path = typer.Option(..., "--config", "-c", help=CONCEPTS_CONFIG_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (OUT/concepts/, OUT/concept_maps/)."),
    device: str | None = typer.Option(None, help="auto (default), cpu, cuda, cuda:N."),
    force: bool = typer.Option(
        False, "--force", help="Refit even when OUT/concepts/ holds a fit of the same settings; redo every map."
    ),
    no_maps: bool = typer.Option(False, "--no-maps", help="Fit and write the atlas only; no per-image concept maps."),
    wait: bool = typer.Option(False, "--wait", help="If another run holds the folder, wait for it (else exit 3)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or table."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
):
    """CRAFT-style concept extraction for one class: K concepts, their importance, where they are.

    Crops the class's images at a few scales, factorises their activations at a layer with NMF, ranks the concepts by gradient x coefficient (or Sobol indices, `importance: sobol`), and writes OUT/concepts/concepts.csv, atlas.png and concepts.safetensors (reused when run again with the same settings); then K concept maps per image in OUT/concept_maps/ (an `xai explain` run with the `concept_maps` method). Walkthrough: docs/concepts.md.

    Example: xai concepts extract --config configs/concepts.yaml
    """
    from .concepts.config import build_concepts_config
    from .concepts.extract import run_extract

    cfg = build_concepts_config(config, {"output": str(out) if out else None, "device": device}, need="extract")
    with interruptible():
        res = run_extract(cfg, progress=None if as_json else _concept_progress(quiet), wait=wait, force=force,
                          maps=not no_maps)  # fmt: skip
    failed = max(res.failed, res.maps.failed if res.maps is not None else 0)  # the same files, read twice
    code = 1 if failed else 0
    if as_json:
        _print_json({"command": "concepts extract", "exit_code": code, "out": str(res.out), "reused": res.reused,
                     "crops": res.crops, "relative_error": res.error, "failed": failed, "seconds": round(res.seconds, 3),
                     "rows": res.rows, "files": {k: str(v) for k, v in res.files.items()},
                     "maps": None if res.maps is None else {"done": res.maps.done, "up_to_date": res.maps.skipped}})  # fmt: skip
    elif not quiet:
        how = (
            "reused (same settings; --force refits)"
            if res.reused
            else f"{res.crops} crops, relative error {res.error:.3f}"
        )
        t = Table(title=f"concepts ({res.out / 'concepts.csv'}; fit: {how})", title_justify="left")
        for col in ("rank", "concept", "importance", "share", "dominant crops"):
            t.add_column(col, justify="right")
        for r in res.rows:
            t.add_row(str(r["rank"]), str(r["concept"]), f"{float(r['importance']):.4g}",
                      f"{float(r['importance_share']):.2f}", str(r["dominant_crops"]))  # fmt: skip
        Console().print(t)
        Console().print(f"atlas: {res.out / 'atlas.png'}", highlight=False)
        if res.maps is not None:
            Console().print(f"concept maps: {res.maps.out / 'concept_maps'} ({res.maps.done} done, "
                            f"{res.maps.skipped} up to date)", highlight=False)  # fmt: skip
    if failed:
        err_console.print(f"[yellow]{failed} image(s) could not be read; see {res.out / 'errors.csv'}[/]")
    raise typer.Exit(code)


def _print_metrics(res) -> None:
    t = Table(title=f"metrics ({res.out / 'metrics_summary.csv'})", title_justify="left")
    for col in ("metric", "better", "method", "mean", "std", "n"):
        t.add_column(
            col, style="bold" if col == "metric" else None, justify="right" if col in ("mean", "std", "n") else "left"
        )
    for r in res.rows:
        better = res.directions.get(r["metric"], "")
        t.add_row(r["metric"], better, r["method"], f"{float(r['mean']):.4f}", f"{float(r['std']):.4f}", str(r["n"]))
    Console().print(t)
    for p in res.plots:
        Console().print(f"plot: {p}", highlight=False)


def _registry_table(title: str, registry: dict) -> Table:
    t = Table(title=title)
    t.add_column("name", style="bold")
    t.add_column("description")
    t.add_column("parameters")
    for name, cls in sorted(registry.items()):
        params = ", ".join(
            f"{f.name}={f.default_factory() if f.default_factory is not MISSING else f.default!r}" for f in cls.params()
        )
        t.add_row(name, cls.description, params)
    return t


EXAMPLES = ("example", "demo", "nightly", "lrp", "perturbation", "concepts")


def example_config(name: str) -> str:
    """The text of a shipped example config (configs/NAME.yaml, in the wheel as xaicli/configs/)."""
    from importlib import resources

    if name not in EXAMPLES:
        raise typer.BadParameter(f"'{name}' is not one of: {', '.join(EXAMPLES)}", param_hint="NAME")
    places = []
    try:
        places.append(resources.files("xaicli.configs") / f"{name}.yaml")  # installed wheel
    except ModuleNotFoundError:
        pass
    places.append(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")  # a checkout
    for p in places:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    raise typer.BadParameter(f"the example config '{name}' is not installed", param_hint="NAME")


@app.command()
def init(
    name: str = typer.Argument("example", help=f"Which example: {', '.join(EXAMPLES)}."),
    inputs: str = typer.Option("imgs/", "--input", "-i", help="The `input:` to write."),
    out: str = typer.Option("xai-out", "--out", "-o", help="The `output:` to write."),
):
    """Print a commented config to start from: `xai init > xai.yaml`, then `xai check -c xai.yaml`.

    `example` lists every key with its allowed values; `demo`, `nightly`, `lrp` and `perturbation` are
    the other shipped configs. The input and output paths are replaced by --input / --out.
    """
    import re

    text = example_config(name)
    text = re.sub(r"(?m)^(input:\n  path: )\S+", lambda m: m.group(1) + inputs, text)
    text = re.sub(r"(?m)^(input: )\S+", lambda m: m.group(1) + inputs, text)
    text = re.sub(r"(?m)^(output: )\S+", lambda m: m.group(1) + out, text)
    sys.stdout.write(text)


@app.command("metrics")
def list_metrics():
    """List the metrics with a one-line description and their parameters."""
    from .metrics import METRICS

    Console().print(_registry_table("metrics", METRICS))


@app.command()
def methods():
    """List the attribution methods with a one-line description and their parameters."""
    from .methods import METHODS

    Console().print(_registry_table("methods", METHODS))


@app.command()
def visualize(
    cls: int = typer.Option(..., "--class", "-k", help="Class index whose logit is maximised (e.g. 285)."),
    model: str = typer.Option("default", help="default | torchvision:NAME | timm:NAME (see `xai models`)."),
    weights: str | None = typer.Option(None, help="default | none | a weights name/tag | a local checkpoint."),
    out: Path = typer.Option(Path("xai-out"), "--out", "-o", help="Output folder (default ./xai-out)."),
    steps: int = typer.Option(200, help="Gradient-ascent steps."),
    lr: float = typer.Option(1.0, help="Step size in normalised input units."),
    l2: float = typer.Option(1e-3, "--l2", help="L2 regularisation weight lambda of ||I||^2."),
    jitter: bool = typer.Option(False, help="Randomly shift the image by up to 4 px each step."),
    blur: bool = typer.Option(False, help="Blur the image lightly (sigma 0.5 px) every 4 steps."),
    device: str = typer.Option("auto", help="auto (default), cpu, cuda, cuda:N."),
):
    """Class model visualisation (Simonyan 2013): the image that maximises a class logit.

    Writes OUT/visualize/class_<c>.png and appends a row to OUT/visualizations.csv.
    """
    from .methods.visualize import visualize_class, write_visualization
    from .models import load_model
    from .models.registry import resolve_device

    lm = load_model(model, weights, device=resolve_device(device))
    pre = lm.preprocess
    vis = visualize_class(
        lm.model,
        cls,
        pre.mean,
        pre.std,
        pre.input_size,
        steps=steps,
        lr=lr,
        l2=l2,
        jitter=4 if jitter else 0,
        blur_sigma=0.5 if blur else 0.0,
    )
    png = write_visualization(out, vis, lm.label(cls), l2, lr)
    Console().print(
        f"class {cls} ({lm.label(cls)}): logit {vis.initial_logit:.3f} -> {vis.final_logit:.3f}, "
        f"probability {vis.final_prob:.4f}; wrote {png}"
    )


@app.command()
def models():
    """How to name a model: the embedded default, torchvision and timm classifiers, checkpoints."""
    t = Table(title="models")
    t.add_column("spec", style="bold")
    t.add_column("what")
    t.add_row("default", "EfficientNet-Lite0, ImageNet weights embedded (offline), timm tf_efficientnet_lite0")
    t.add_row(
        "torchvision:NAME",
        "any torchvision classifier, e.g. torchvision:resnet50 (weights: DEFAULT, IMAGENET1K_V2, none)",
    )
    t.add_row(
        "timm:NAME",
        "any timm classifier, e.g. timm:convnext_tiny, timm:vit_small_patch16_224 (weights: default, a tag, none)",
    )
    t.add_row(
        "my_pkg.module:build",
        "your own model: a function returning an nn.Module (called with num_classes=N when it takes it)",
    )
    t.add_row("path/to/file.py:build", "the same from a Python file (relative to the config file)")
    t.add_row("+ weights: PATH", "a local checkpoint for that architecture: .safetensors, or .pt/.pth (weights_only)")
    t.add_row(
        "+ num_classes, class_names",
        "the head's classes and a text file naming them; preprocessing: input_size, resize, crop, mean, std, interpolation",
    )
    Console().print(t)
    Console().print(
        "Named weights download once into the torch/Hugging Face cache; offline, only cached or local weights work."
    )


def _sigterm(_signum, _frame):
    raise KeyboardInterrupt  # cron/systemd stop: finish the batch files in flight, exit 130


@contextmanager
def interruptible():
    """Ctrl-C / SIGTERM inside a command: say so and exit 130 (batches already written stay)."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: finished batches are kept; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: typer handles usage errors (exit 2); XaiError -> one line + its exit code."""
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        app(args=argv, standalone_mode=True)
    except XaiError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    except OSError as e:  # disk full, permission denied on OUT, ...: the environment, not a bug
        err_console.print(f"[bold red]error:[/] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
        sys.exit(EXIT_INTERNAL)
    except Exception as e:
        if os.environ.get("XAI_DEBUG"):
            raise
        err_console.print(
            f"[bold red]internal error:[/] {escape(f'{type(e).__name__}: {e}')} "
            "(finished batches are kept; set XAI_DEBUG=1 for the traceback and please report it)",
            highlight=False,
        )
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
