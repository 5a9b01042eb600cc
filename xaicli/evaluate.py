"""Metrics over explanations: in the batch loop of `xai explain --metrics`, or afterwards from an
output folder with `xai evaluate` (which reads only the documented layout and run.yaml).

    OUT/metrics.csv            image, method, metric, value      (one row per image, method, metric)
    OUT/metrics_summary.csv    method, metric, mean, std, n      (over the images with a finite value)
    OUT/metrics_curves.csv     metric, method, x, mean           (mean curve of each curve metric)
    OUT/metrics_<metric>.png   the mean curves of all methods in one plot, AUC/AOPC per method
    OUT/sanity.csv, OUT/sanity_<method>.png   cascading randomization (metric `sanity`)
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import DEFAULT_OUT, RunConfig, _named_list, _rebase, format_validation_error, read_yaml, with_against
from .errors import ConfigError, InputError
from .metrics import METRICS, Metric, build_metric
from .outputs import CsvAppender, atomic_write_bytes, map_paths, read_csv, read_run_yaml

METRIC_FIELDS = ["image", "method", "metric", "value"]
SUMMARY_FIELDS = ["method", "metric", "mean", "std", "n"]
PARTIAL = ".metrics-partial.csv"
DEFAULT_METRICS = "deletion,insertion"


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.9g}"


@dataclass
class EvalSummary:
    out: Path
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)  # metrics_summary.csv rows
    plots: list[Path] = field(default_factory=list)
    directions: dict[str, str] = field(default_factory=dict)


def build_metrics(specs: list, method_keys: list[str], preprocess=None) -> list[Metric]:
    """MetricCfg-like specs (name + params) -> prepared Metric objects; checks `against`."""
    out = []
    for spec in specs:
        name, params = (spec.name, spec.params) if hasattr(spec, "name") else (spec["name"], spec.get("params", {}))
        m = build_metric(name, **params)
        against = getattr(m, "against", None)
        if "reference" in m.needs and against is None:
            raise ConfigError(f"metric '{name}' needs --against METHOD (one of: {', '.join(method_keys)})")
        if against is not None and against not in method_keys:
            raise ConfigError(f"--against: '{against}' is not a method of this run (one of: {', '.join(method_keys)})")
        m.prepare(preprocess)
        out.append(m)
    return out


class MetricSession:
    """Computes every metric on each batch (on its device) and writes the metric files."""

    def __init__(
        self, out: Path, metrics: list[Metric], methods: dict, preprocess, annotations=None, replace_all: bool = False
    ):
        """replace_all: at the end, drop every earlier row of the metrics computed now (`xai
        evaluate`); otherwise only the rows of the same (image, method, metric) (a resumed run)."""
        self.out = Path(out)
        self.replace_all = replace_all
        self.metrics = metrics
        self.methods = methods  # key -> Method (sanity checks recompute maps)
        self.preprocess = preprocess
        self.annotations = annotations
        self.curves: dict[tuple[str, str], list] = {}  # (curve key, method) -> [sum, count, metric]
        self.sanity_rows: list[dict] = []
        self.directions: dict[str, str] = {m.name: m.direction for m in metrics}
        partial = self.out / PARTIAL
        partial.unlink(missing_ok=True)
        self.rows = CsvAppender(partial, METRIC_FIELDS)
        needs_boxes = [m.name for m in metrics if "boxes" in m.needs]
        if needs_boxes and annotations is None:
            raise ConfigError(f"metric(s) {', '.join(needs_boxes)} need bounding boxes: give --annotations FILE")

    def add_batch(self, model: nn.Module, x: Tensor, maps: dict[str, Tensor], target: Tensor, items, sizes) -> None:
        """maps: method key -> [B,H,W] on x's device; items: ImageItem (rel, path) per image;
        sizes: (width, height) of each original image (for the annotation boxes)."""
        boxes = None
        if self.annotations is not None:
            boxes = [
                self.annotations.boxes_in_input(it.rel, it.path, size, self.preprocess, tuple(x.shape[-2:]), x.device)
                for it, size in zip(items, sizes, strict=True)
            ]
        rows = []
        for metric in self.metrics:
            for key, m in maps.items():
                extras = {}
                sel = None
                if "reference" in metric.needs:
                    if key == metric.against:
                        continue
                    extras["reference"] = maps[metric.against].float()
                if "method" in metric.needs:
                    extras["method"] = self.methods[key]
                if "boxes" in metric.needs:
                    sel = [j for j, b in enumerate(boxes) if b is not None and len(b)]
                    if not sel:
                        continue
                    extras["boxes"] = [boxes[j] for j in sel]
                if sel is not None and len(sel) < len(items):
                    idx = torch.tensor(sel, device=x.device)
                    res = metric(model, x[idx], m.float()[idx], target[idx], **extras)
                    its = [items[j] for j in sel]
                else:
                    res = metric(model, x, m.float(), target, **extras)
                    its = list(items)
                for name, val in res.items():
                    self.directions.setdefault(name, metric.direction)
                    val = val.detach().double().cpu()
                    if name.endswith(":curve"):
                        acc = self.curves.setdefault(
                            (name, key), [torch.zeros(val.shape[1:], dtype=torch.float64), 0, metric]
                        )
                        ok = torch.isfinite(val).all(dim=1)
                        acc[0] += val[ok].sum(0)
                        acc[1] += int(ok.sum())
                    elif name.endswith(":table"):
                        continue
                    else:
                        rows += [
                            {"image": it.rel, "method": key, "metric": name, "value": _fmt(float(v))}
                            for it, v in zip(its, val.tolist(), strict=True)
                        ]
                table = getattr(metric, "_table", None)
                if table is not None:
                    for r in table:
                        self.sanity_rows.append({"image": its[r.pop("index")].rel, "method": key, **r})
                    metric._table = None
        self.rows.append(rows)

    # -- end of the run ---------------------------------------------------------------------
    def finish(self) -> EvalSummary:
        partial = self.out / PARTIAL
        new = read_csv(partial)
        keys = {(r["image"], r["method"], r["metric"]) for r in new}
        names = {r["metric"] for r in new} | {m.name for m in self.metrics}
        old = [
            r
            for r in read_csv(self.out / "metrics.csv")
            if (r["image"], r["method"], r["metric"]) not in keys and not (self.replace_all and r["metric"] in names)
        ]
        all_rows = old + new
        _write_csv(self.out / "metrics.csv", METRIC_FIELDS, all_rows)
        partial.unlink(missing_ok=True)
        summary = summarize(all_rows)
        _write_csv(self.out / "metrics_summary.csv", SUMMARY_FIELDS, summary)
        res = EvalSummary(self.out, rows=summary)
        from .metrics.base import direction_of

        res.directions = {r["metric"]: direction_of(r["metric"]) for r in summary} | self.directions
        res.plots = self._write_curves(summary)
        if self.sanity_rows:
            from .metrics.sanity import write_sanity

            res.plots += write_sanity(self.out, self.sanity_rows)
        return res

    def _write_curves(self, summary: list[dict]) -> list[Path]:
        if not self.curves:
            return []
        means = {k: (s / max(n, 1), m) for k, (s, n, m) in self.curves.items() if n}
        lines = []
        for (name, key), (mean, metric) in means.items():
            xs = metric.curve_x(mean.shape[0])
            lines += [
                {"metric": name.removesuffix(":curve"), "method": key, "x": _fmt(float(a)), "mean": _fmt(float(b))}
                for a, b in zip(xs, mean.tolist(), strict=True)
            ]
        _write_csv(self.out / "metrics_curves.csv", ["metric", "method", "x", "mean"], lines)
        stat = {(r["metric"], r["method"]): r for r in summary}
        plots = []
        for name in dict.fromkeys(n for n, _ in means):
            base = name.removesuffix(":curve")
            per = [(key, *means[(name, key)]) for (n, key) in means if n == name]
            plots.append(plot_curves(self.out / f"metrics_{base}.png", base, per, stat))
        return plots


def summarize(rows: list[dict]) -> list[dict]:
    """metrics.csv rows -> (method, metric, mean, std, n) over finite values; std is the sample std."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        try:
            v = float(r["value"])
        except (TypeError, ValueError):
            continue
        groups.setdefault((r["method"], r["metric"]), [])
        if math.isfinite(v):
            groups[(r["method"], r["metric"])].append(v)
    out = []
    for (method, metric), vals in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        n = len(vals)
        mean = sum(vals) / n if n else float("nan")
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0 if n else float("nan")
        out.append({"method": method, "metric": metric, "mean": _fmt(mean), "std": _fmt(std), "n": n})
    return out


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def plot_curves(path: Path, metric: str, per_method: list, stat: dict) -> Path:
    """One figure: the mean curve of each method, its AUC/AOPC (mean over images) in the legend and title."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    parts = []
    xlabel, ylabel, label_name = "step", "probability", "score"
    for key, mean, m in per_method:
        xs = m.curve_x(mean.shape[0])
        xlabel, ylabel = m.curve_xlabel, m.curve_ylabel
        s = stat.get((metric, key))
        score = f"{float(s['mean']):.3f}" if s else "?"
        label_name = m.score_label
        ax.plot(xs, mean.numpy(), label=f"{key} ({label_name} {score})", linewidth=1.8)
        parts.append(f"{key} {score}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    direction = per_method[0][2].direction if per_method else ""
    ax.set_title(
        f"{metric} ({'lower' if direction == 'lower' else 'higher'} is better)\n{label_name}: " + ", ".join(parts),
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(title="method")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------
# xai evaluate
# --------------------------------------------------------------------------------------------
def resolve_out(out: str | Path | None, config: str | Path | None) -> tuple[Path, dict]:
    """The output folder to evaluate and the config file's data (rebased), if any."""
    data: dict = {}
    if config is not None:
        data = _rebase(read_yaml(config), Path(config).resolve().parent)
    if out is None:
        out = data.get("output") or DEFAULT_OUT
    return Path(out), data


def metric_specs(names: str | None, against: str | None, cfg_data: dict, run_cfg: RunConfig) -> list[dict]:
    """--metric names (params from the config file's `metrics:` where it names them), else the
    config file's metrics, else run.yaml's, else deletion,insertion."""
    from_cfg = _named_list(cfg_data.get("metrics") or []) or []
    if names:
        by_name = {d["name"]: d for d in from_cfg if isinstance(d, dict)}
        specs = [dict(by_name.get(d["name"], d)) for d in _named_list(names)]
    elif from_cfg:
        specs = from_cfg
    elif run_cfg.metrics:
        specs = [{"name": m.name, "params": dict(m.params)} for m in run_cfg.metrics]
    else:
        specs = _named_list(DEFAULT_METRICS)
    if against is not None:
        specs = with_against(specs, against)
    for s in specs:
        s.setdefault("params", {})
        if s["name"] not in METRICS:
            raise ConfigError(f"--metric: unknown metric '{s['name']}' (allowed: {', '.join(sorted(METRICS))})")
    if len({s["name"] for s in specs}) != len(specs):
        raise ConfigError("--metric: a metric appears twice")
    return specs


def run_evaluate(
    out: str | Path | None = None,
    metrics: str | None = None,
    *,
    against: str | None = None,
    config: str | Path | None = None,
    annotations: str | Path | None = None,
    device: str | None = None,
    progress=None,
) -> EvalSummary:
    """Compute metrics for the maps of an output folder written by `xai explain`."""
    from pydantic import ValidationError

    from .data import ImageDataset, ImageItem, discover, make_loader
    from .methods import build_method
    from .methods.base import eval_mode
    from .models.registry import load_model_cfg
    from .runner import resolve_device

    t0 = time.perf_counter()
    out, cfg_data = resolve_out(out, config)
    if not out.is_dir():
        raise InputError(f"{out}: no such output folder (run `xai explain` first, or name the folder)")
    run = read_run_yaml(out)
    if not run or "config" not in run:
        raise InputError(f"{out}: no run.yaml here; is this an output folder of `xai explain`?")
    try:
        run_cfg = RunConfig.model_validate(run["config"])
    except ValidationError:
        try:  # a metric this version does not know: evaluate the maps anyway
            run_cfg = RunConfig.model_validate({**run["config"], "metrics": []})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, str(out / "run.yaml"))) from None
    keys = [m.key for m in run_cfg.methods]
    specs = metric_specs(metrics, against, cfg_data, run_cfg)
    metric_objs = build_metrics(specs, keys)  # every check before any heavy work
    annotations = annotations or cfg_data.get("annotations") or run_cfg.annotations
    needs_boxes = [m.name for m in metric_objs if "boxes" in m.needs]
    if needs_boxes and not annotations:
        raise ConfigError(f"metric(s) {', '.join(needs_boxes)} need bounding boxes: give --annotations FILE")

    rows = read_csv(out / "explanations.csv")
    if not rows:
        raise InputError(f"{out}: explanations.csv is missing or empty: nothing to evaluate")
    by_image: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["method"]] = r  # a later row (a re-run) wins
    locate = _locator(out, run_cfg.output)
    fallback: dict[str, Path] | None = None
    items, targets, skipped = [], [], 0
    for rel, per in by_image.items():
        ok = all(k in per and per[k].get("status") == "ok" and map_paths(out, k, rel)[1].is_file() for k in keys)
        if not ok:
            skipped += 1
            continue
        first = per[keys[0]]
        path = locate(first["path"]) if first.get("path") else None
        if path is None or not path.is_file():
            if fallback is None:
                fallback = {}
                root = (run.get("resolved") or {}).get("input_root")
                spec = run_cfg.input.path if run_cfg.input else root
                recursive = run_cfg.input.recursive if run_cfg.input else True
                try:
                    fallback = {it.rel: it.path for it in discover(locate(spec), recursive).items}
                except Exception:  # the input moved: every image without a path column is skipped
                    fallback = {}
            path = fallback.get(rel)
        if path is None or not Path(path).is_file():
            skipped += 1
            continue
        items.append(ImageItem(Path(path), rel))
        targets.append(int(first["target_class"]))
    if not items:
        raise InputError(f"{out}: no image has maps of every method ({', '.join(keys)}) and a readable source file")

    dev = resolve_device(device or run_cfg.device)
    lm = load_model_cfg(run_cfg.model, dev)
    method_objs = {}
    for mc in run_cfg.methods:
        meth = build_method(mc.name, **mc.params)
        layer = ((run.get("resolved") or {}).get("layers") or {}).get(mc.key)
        if meth.needs_layer and getattr(meth, "layer", None) is None:
            meth.layer = layer or run_cfg.model.layer
        method_objs[mc.key] = meth
    for m in metric_objs:
        m.prepare(lm.preprocess)
    if any("method" in m.needs for m in metric_objs):
        for meth in method_objs.values():
            if hasattr(meth, "bind_preprocess"):
                meth.bind_preprocess(lm.preprocess)
            meth.prepare(lm.model, lm.preprocess.input_size)
    ann = None
    if annotations:
        from .metrics.localization import Annotations

        ann = Annotations.load(annotations)
    session = MetricSession(out, metric_objs, method_objs, lm.preprocess, ann, replace_all=True)
    dataset = ImageDataset(items, lm.preprocess, run_cfg.max_pixels)
    loader = make_loader(dataset, run_cfg.batch_size, run_cfg.workers, pin_memory=dev.type == "cuda")
    done = 0
    if progress:
        progress.start(len(items))
    try:
        with eval_mode(lm.model):
            for batch in loader:
                skipped += len(batch.failures)
                if batch.x is not None and batch.indices:
                    its = [items[i] for i in batch.indices]
                    x = batch.x.to(dev)
                    maps = {
                        k: torch.stack([torch.from_numpy(_load_npy(map_paths(out, k, it.rel)[1])) for it in its]).to(
                            dev
                        )
                        for k in keys
                    }
                    tgt = torch.tensor([targets[i] for i in batch.indices], dtype=torch.long, device=dev)
                    sizes = [(int(o.shape[1]), int(o.shape[0])) for o in batch.origs]
                    session.add_batch(lm.model, x, maps, tgt, its, sizes)
                    done += len(its)
                if progress:
                    progress.advance(len(batch.indices) + len(batch.failures))
    finally:
        if progress:
            progress.stop()
    res = session.finish()
    res.images, res.skipped = done, skipped
    res.seconds = time.perf_counter() - t0
    return res


def _locator(out: Path, recorded_output: str):
    """Resolve a path recorded by the run: absolute as is; a relative one against the current
    folder, else against the folder the run was started from (OUT minus its recorded relative
    `output`, e.g. /home/u/proj for OUT=/home/u/proj/runs/a recorded as runs/a)."""
    base = None
    rec = Path(recorded_output)
    if not rec.is_absolute():
        parts, full = rec.parts, out.resolve().parts
        if parts and len(full) >= len(parts) and tuple(full[-len(parts) :]) == tuple(parts):
            base = Path(*full[: len(full) - len(parts)]) if len(full) > len(parts) else Path("/")

    def locate(p: str | Path) -> Path:
        q = Path(p)
        if q.is_absolute() or q.exists() or base is None:
            return q
        return base / q if (base / q).exists() else q

    return locate


def _load_npy(p: Path):
    import numpy as np

    return np.load(p).astype(np.float32, copy=False)


def start_metrics(cfg: RunConfig, lm, methods: list, out: Path) -> MetricSession | None:
    """For `xai explain --metrics`: a session over the run's methods, or None without metrics."""
    if not cfg.metrics:
        return None
    keys = [k for k, _ in methods]
    metric_objs = build_metrics(cfg.metrics, keys, lm.preprocess)
    ann = None
    if cfg.annotations:
        from .metrics.localization import Annotations

        ann = Annotations.load(cfg.annotations)
    return MetricSession(out, metric_objs, dict(methods), lm.preprocess, ann)
