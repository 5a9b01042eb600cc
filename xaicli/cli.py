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
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True, soft_wrap=True)  # one line per message, also in cron logs


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
    inputs: str | None = typer.Argument(
        None, help="Folder (searched recursively), glob pattern ('imgs/**/*.jpg'), image file, or .txt list of paths."
    ),
    method: str | None = typer.Option(
        None, "--method", "-m", help="Method(s), comma-separated (default gradcam). See `xai methods`."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default ./xai-out)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run config; flags override its values."),
    model: str | None = typer.Option(None, help="default | torchvision:NAME | timm:NAME (see `xai models`)."),
    weights: str | None = typer.Option(
        None, help="default | none | a weights name/tag | a local .safetensors/.pt/.pth checkpoint."
    ),
    layer: str | None = typer.Option(None, help="Target layer for CAM methods (found automatically if omitted)."),
    target: str | None = typer.Option(
        None, help="'predicted' (default), a class index, or a labels CSV with columns image,class."
    ),
    device: str | None = typer.Option(None, help="auto (default), cpu, cuda, cuda:N."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Images per batch (default 8)."),
    workers: int | None = typer.Option(None, help="DataLoader decode workers (default 2)."),
    colormap: str | None = typer.Option(None, help="Matplotlib colormap for the overlays (default jet)."),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        help="Also compute metrics in the batch loop, comma-separated (e.g. deletion,insertion,avg-drop); "
        "writes OUT/metrics.csv, metrics_summary.csv and curve PNGs. See `xai metrics`.",
    ),
    against: str | None = typer.Option(None, "--against", help="Method the `win` metric compares with."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="Bounding boxes (CSV, JSON or Pascal VOC XML) for the localization metrics."
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

    overrides = {
        "input": inputs,
        "methods": method,
        "output": str(out) if out else None,
        "model.name": model,
        "model.weights": weights,
        "model.layer": layer,
        "target": target,
        "device": device,
        "batch_size": batch_size,
        "workers": workers,
        "colormap": colormap,
        "metrics": metrics,
        "against": against,
        "annotations": str(annotations) if annotations else None,
        "sheet": True if sheet else None,
        "overlay_format": overlay_format,
        "overlay_max_side": overlay_max_side,
        "save_maps": save_maps,
        "amp": amp,
        "channels_last": True if channels_last else None,
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
    if dry_run:
        if as_json:
            _print_json(
                {
                    "command": "explain",
                    "dry_run": True,
                    "out": str(summary.out),
                    "images": summary.total,
                    "up_to_date": summary.skipped,
                    "todo": [str(it.path) for it in summary.planned],
                    "exit_code": 0,
                }
            )
        else:
            _print_plan(summary)
        raise typer.Exit(0)
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
        "files": _files(s.out, rep),
    }
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
    console = Console()
    t = Table(title="xai explain", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("images", str(s.total))
    if s.skipped:
        t.add_row("up to date", f"{s.skipped} (from an earlier run; --force redoes them)")
    t.add_row("done", str(s.done))
    t.add_row("failed", str(s.failed) + (" (see errors.csv)" if s.failed else ""))
    if s.flagged:
        t.add_row("flagged maps", f"{s.flagged} (nonfinite/oom, see explanations.csv status)")
    if s.ignored:
        t.add_row("ignored", f"{s.ignored} non-image file(s)")
    t.add_row("time", f"{s.seconds:.1f} s ({s.images_per_second:.2f} images/s)")
    for k, v in s.method_seconds.items():
        t.add_row(f"  {k}", f"{v:.2f} s on the device")
    t.add_row("outputs", str(s.out.resolve()))
    console.print(t)


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
    t.add_row("+ weights: PATH", "a local checkpoint for that architecture: .safetensors, or .pt/.pth (weights_only)")
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
