"""Sinks: what the engine's batch results become on disk.

    ErrorSink    OUT/errors.csv rows (decode failures, missing labels, files that cannot be written)
    MapSink      OUT/<method>/<rel>.png|.jpg|.webp + .npy|.npz on a bounded thread pool, then the batch's
                 explanations.csv rows
    MetricSink   OUT/metrics.csv (+ summary, curves, plots, sanity.csv) from the maps on the device

Every sink has `consume(BatchResult)`, `fail(rows)` and `close(status)`; the engine calls close on
any exit (Ctrl-C, SIGTERM, an error), so everything finished stays on disk.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import display_path
from .engine import OK, SKIP, BatchResult, sync
from .outputs import (
    ERROR_FIELDS,
    METRIC_FIELDS,
    CsvAppender,
    caption_strip,
    ensure_inside,
    map_paths,
    overlay,
    read_csv,
    save_figure,
    save_image,
    save_map,
    write_csv,
)

SUMMARY_FIELDS = ["method", "metric", "mean", "std", "n"]
CLASS_SUMMARY_FIELDS = ["by", "class", "label", "method", "metric", "mean", "std", "n"]
CURVE_FIELDS = ["metric", "method", "x", "mean"]
PARTIAL = ".metrics-partial.csv"


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.9g}"


class ErrorSink:
    """errors.csv, the summary's failure count and the JSON log's image_error events."""

    def __init__(self, out: Path, summary, log):
        self.table = CsvAppender(out / "errors.csv", ERROR_FIELDS)
        self.summary = summary
        self.log = log

    def fail(self, rows: list[dict]) -> None:
        self.table.append(rows)
        self.summary.failed += len(rows)
        self.summary.errors.extend((r["path"], r["reason"]) for r in rows)
        for r in rows:
            self.log.event("image_error", image=r["image"], reason=r["reason"])

    def consume(self, result: BatchResult) -> None:
        pass

    def close(self, status: str) -> None:
        pass


# --------------------------------------------------------------------------------------------
# maps and explanations.csv
# --------------------------------------------------------------------------------------------
def _write_one(out: Path, image: Path, raw: Path | None, cam: np.ndarray, orig: np.ndarray, box, look: dict, caption):
    ensure_inside(out, image)
    if raw is not None:
        save_map(raw, cam)
    draw_png(image, cam, orig, box, look, caption)


def draw_png(image: Path, cam: np.ndarray, orig: np.ndarray, box, look: dict, caption) -> None:
    """The overlay of one map (MapStyle.look) as png, jpg or webp by the file's suffix, with its
    caption strip when asked for."""
    img = overlay(orig, cam, box, look["cmap"], look["alpha"], look["kind"], look["clip_percentile"])
    if caption is not None or look["colorbar"]:
        img = caption_strip(img, caption, look["cmap"] if look["colorbar"] else None, look["kind"])
    save_image(image, img, image.suffix.lstrip("."))


@dataclass
class MapStyle:
    """How MapSink draws overlays: the config's overlay section and each method's map kind."""

    colormap: str = "jet"
    alpha: float = 0.5
    diverging: str = "bwr"  # for signed maps
    clip_percentile: float = 99.5
    caption: bool = False
    colorbar: bool = False
    kinds: dict[str, str] = field(default_factory=dict)  # method key -> spec.map_kind

    @classmethod
    def of(cls, cfg, kinds: dict[str, str]) -> MapStyle:
        """The style of a RunConfig (its overlay section, colormap/alpha filled from the top level)."""
        o = cfg.overlay_style()
        return cls(o.colormap, o.alpha, o.diverging, o.clip_percentile, o.caption, o.colorbar, kinds)

    def look(self, key: str) -> dict:
        kind = self.kinds.get(key, "positive")
        cmap = self.diverging if kind == "signed" else self.colormap
        return {
            "cmap": cmap,
            "alpha": self.alpha,
            "kind": kind,
            "clip_percentile": self.clip_percentile,
            "colorbar": self.colorbar,
        }


def probabilities(logits: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """The reported probabilities [B, C]: softmax, or per-class sigmoids with `score: sigmoid`
    and for a single-logit (binary) head, whose softmax would always be 1."""
    logits = logits.float()
    if score == "sigmoid" or logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def caption_of(row: dict, name: str | None = None) -> str:
    """'method: label (p 0.93)' for an explanations.csv row; the top-1 class too when it differs."""
    method = row["method"] + (f"/{name}" if name else "")
    text = f"{method}: {row['target_label']} (p {float(row['target_prob']):.2f})"
    if str(row["top1_class"]) != str(row["target_class"]):
        text += f", top-1 {row['top1_label']} ({float(row['top1_prob']):.2f})"
    return text


class MapSink:
    """Encodes map files on a thread pool; appends a batch's CSV rows once all its files exist.

    A file that cannot be written (a path through a symlink out of OUT, a name too long...) fails
    that image and method only: its row goes to errors.csv instead.
    """

    def __init__(
        self,
        out: Path,
        lm,
        fields,
        keys: dict,
        style: MapStyle,
        summary,
        log,
        errors: ErrorSink,
        formats: tuple = ("png", "npy"),
        writers: int = 4,
        queue: int = 4,
        score: str = "logit",
    ):
        self.out, self.lm, self.style, self.summary, self.log, self.errors = out, lm, style, summary, log, errors
        self.score = score  # sigmoid: probabilities are per-class sigmoids (also for a single-logit head)
        self.keys = keys  # rel -> (size, mtime_ns): the resume key
        self.formats = formats  # (overlay_format, save_maps)
        self.table = CsvAppender(out / "explanations.csv", fields)
        self.pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="xai-writer")
        # the bounded queue between the device loop and the writers: at most `queue` batches are
        # in flight; consume() then waits for the oldest, so memory stays flat when writing is the
        # bottleneck (12 MP overlays) and the device runs ahead by at most `queue` batches
        self.queue = queue
        self.pending: deque[tuple[list[tuple[Future, str, str]], list[dict]]] = deque()

    def fail(self, rows: list[dict]) -> None:
        pass

    def consume(self, result: BatchResult) -> None:
        probs = probabilities(result.logits, self.score).cpu()
        tgt = result.target.cpu()
        origs = [o.numpy() for o in result.origs]
        futures, rows = [], []
        for key, out in result.outputs.items():
            if all(st == SKIP for st in out.status):  # up to date for every image of the batch
                continue
            maps = out.maps.detach().float().cpu()  # one transfer per batch and method
            self.summary.method_seconds[key] = self.summary.method_seconds.get(key, 0.0) + out.seconds
            for j, it in enumerate(result.items):
                if out.status[j] == SKIP:
                    continue
                row = self._row(key, out, j, it, maps[j], probs[j], int(tgt[j]))
                row["_key"] = result.key(j)  # not a column: the map's key, for write failures
                rows.append(row)
                if out.status[j] == OK:
                    futures += self._submit(key, out.names, result.key(j), maps[j], origs[j], row)
                else:
                    self.summary.flagged += 1
                    self.log.event("map_flagged", image=it.rel, method=key, status=out.status[j])
        self.summary.done += len({it.rel for it in result.items})
        self.pending.append((futures, rows))
        self._drain(block=len(self.pending) > self.queue)

    def _row(self, key, out, j, it, m, probs, t) -> dict:
        size_mtime = self.keys.get(it.rel) or ("", "")
        top_p, top_c = probs.max(dim=0)
        row = {
            "image": it.rel,
            "method": key,
            "target_class": t,
            "target_label": self.lm.label(t),
            "target_prob": f"{float(probs[t]):.6f}",
            "top1_class": int(top_c),
            "top1_label": self.lm.label(int(top_c)),
            "top1_prob": f"{float(top_p):.6f}",
            "seconds": f"{out.seconds / max(1, sum(st != SKIP for st in out.status)):.6f}",
            "map_min": f"{float(m.min()):.6g}",
            "map_max": f"{float(m.max()):.6g}",
            "status": out.status[j],
            "path": display_path(it.path),
            "size": size_mtime[0],
            "mtime_ns": size_mtime[1],
        }
        for name, vals in out.extras.items():
            row[name] = f"{float(vals[j]):.6g}"
        return row

    def _submit(self, key: str, names: tuple[str, ...], rel: str, m: torch.Tensor, orig: np.ndarray, row) -> list:
        h, w = orig.shape[:2]
        box = self.lm.preprocess.crop_box(w, h)
        maps = [(None, m)] if not names else list(zip(names, m, strict=True))
        futs = []
        for name, one in maps:
            image, raw = map_paths(self.out, key, rel, name, *self.formats)
            caption = caption_of(row, name) if self.style.caption else None
            args = (self.out, image, raw, one.numpy(), orig, box, self.style.look(key), caption)
            futs.append((self.pool.submit(_write_one, *args), rel, key))
        return futs

    def _drain(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f, _, _ in self.pending[0][0])):
            futures, rows = self.pending.popleft()
            failed = {}
            for f, image, method in futures:
                exc = f.exception()
                if exc is not None:
                    if not isinstance(exc, OSError):
                        raise exc
                    failed[(image, method)] = f"could not write output: {type(exc).__name__}: {exc}"
            bad = [r for r in rows if (r["_key"], r["method"]) in failed]
            self.errors.fail(
                [
                    {
                        "image": r["image"],
                        "path": r["path"],
                        "reason": f"{r['method']}: {failed[(r['_key'], r['method'])]}",
                    }
                    for r in bad
                ]
            )
            self.table.append([r for r in rows if (r["_key"], r["method"]) not in failed])
            block = block and len(self.pending) > self.queue

    def flush(self) -> None:
        """Wait for every batch in flight: its files written, its rows appended."""
        while self.pending:
            self._drain(block=True)

    def close(self, status: str) -> None:
        try:
            while self.pending:
                self._drain(block=True)
        finally:
            self.pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
@dataclass
class EvalSummary:
    out: Path
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)  # metrics_summary.csv rows of the metrics this run computed
    plots: list[Path] = field(default_factory=list)
    directions: dict[str, str] = field(default_factory=dict)


class MetricSink:
    """Computes every metric on each batch (on its device) and writes the metric files.

    Rows go to OUT/.metrics-partial.csv as batches finish and are merged into metrics.csv on
    close (also after Ctrl-C); rows a killed run left in the partial file are merged first, never
    deleted. replace_all (xai evaluate, when it completes): earlier rows of the metrics computed
    now are dropped; otherwise only rows of the same (image, method, metric) are replaced.
    """

    def __init__(self, out: Path, metrics: list, ctx, methods: dict, annotations=None, replace_all: bool = False):
        self.out = Path(out)
        self.metrics, self.ctx, self.methods, self.annotations = metrics, ctx, methods, annotations
        self.replace_all = replace_all
        self.curves: dict[tuple[str, str], list] = {}  # (metric, method) -> [sum, count, Curve]
        self.sanity_rows: list[dict] = []
        self.directions: dict[str, str] = {m.name: m.direction for m in metrics}
        self.seconds: dict[str, float] = {m.name: 0.0 for m in metrics}  # device time per metric (the summary)
        self.result: EvalSummary | None = None
        if (self.out / PARTIAL).exists():
            _merge(self.out, read_csv(self.out / PARTIAL, METRIC_FIELDS), names=set(), replace_all=False)
            (self.out / PARTIAL).unlink(missing_ok=True)
        self.rows = CsvAppender(self.out / PARTIAL, METRIC_FIELDS)

    def fail(self, rows: list[dict]) -> None:
        pass

    def consume(self, result: BatchResult) -> None:
        boxes, labels = self._boxes(result)
        maps, skip = {}, {}  # a method with K named maps is scored per map, as "<method>/<name>"
        for k, o in result.outputs.items():
            maps.update({f"{k}/{n}": o.maps[:, j] for j, n in enumerate(o.names)} if o.names else {k: o.maps})
            skipped = {j for j, st in enumerate(o.status) if st == SKIP}  # up to date: not computed now
            skip.update({f"{k}/{n}": skipped for n in o.names} if o.names else {k: skipped})
        rows = []
        for metric in self.metrics:
            sync(result.x.device)
            t0 = time.perf_counter()
            for key, m in maps.items():
                rows += self._one(metric, key, m, maps, result, boxes, labels, skip)
            sync(result.x.device)
            self.seconds[metric.name] += time.perf_counter() - t0
        self.rows.append(rows)

    def _boxes(self, result: BatchResult):
        """(boxes, their class labels) per image of the batch, or (None, None) without annotations."""
        if self.annotations is None:
            return None, None
        pre, hw, dev = self.ctx.preprocess, tuple(result.x.shape[-2:]), result.x.device
        sizes = [result.size(j) for j in range(len(result.items))]
        pairs = list(zip(result.items, sizes, strict=True))
        boxes = [self.annotations.boxes_in_input(it.rel, it.path, size, pre, hw, dev) for it, size in pairs]
        labels = [self.annotations.class_labels_in_input(it.rel, it.path, size, pre, hw) for it, size in pairs]
        return boxes, labels

    def _one(self, metric, key: str, m, maps: dict, result: BatchResult, boxes, labels=None, skip=None) -> list[dict]:
        skip = skip or {}
        extras, sel = {}, [j for j in range(len(result.items)) if j not in skip.get(key, ())]
        if "reference" in metric.needs:
            if key == metric.against:
                return []
            extras["reference"] = maps[metric.against].float()
            sel = [j for j in sel if j not in skip.get(metric.against, ())]
        if "method" in metric.needs:
            if key not in self.methods:  # one of K named maps: no single map to recompute
                return []
            extras["method"] = self.methods[key]
        if "boxes" in metric.needs:
            sel = [j for j in sel if boxes[j] is not None and len(boxes[j])]
            extras["boxes"] = [boxes[j] for j in sel]
            extras["box_labels"] = [labels[j] for j in sel]  # class index per box (None: unlabelled)
        if not sel:
            return []
        idx = torch.tensor(sel, device=result.x.device)
        if "reference" in extras:
            extras["reference"] = extras["reference"][idx]
        res = metric(self.ctx, result.x[idx], m.float()[idx], result.target[idx], **extras)
        its = [result.key(j) for j in sel]
        for name, curve in res.curves.items():
            y = curve.y.detach().double().cpu()
            ok = torch.isfinite(y).all(dim=1)
            acc = self.curves.setdefault((name, key), [torch.zeros(y.shape[1:], dtype=torch.float64), 0, curve, metric])
            acc[0] += y[ok].sum(0)
            acc[1] += int(ok.sum())
        for r in res.table:
            self.sanity_rows.append({"image": its[r.pop("index")], "method": key, **r})
        rows = []
        for name, val in res.scores.items():
            self.directions.setdefault(name, metric.direction)
            vals = val.detach().double().cpu().tolist()
            rows += [
                {"image": it, "method": key, "metric": name, "value": _fmt(v)} for it, v in zip(its, vals, strict=True)
            ]
        return rows

    def close(self, status: str) -> None:
        new = read_csv(self.out / PARTIAL, METRIC_FIELDS)
        names = {r["metric"] for r in new} | {m.name for m in self.metrics}
        all_rows = _merge(self.out, new, names, replace_all=self.replace_all and status == "done")
        (self.out / PARTIAL).unlink(missing_ok=True)
        summary = summarize(all_rows)
        per_class = {m.name for m in self.metrics if getattr(m, "average", "image") == "class"}
        if per_class:
            summary = class_averaged(self.out, all_rows, summary, per_class)
        write_csv(self.out / "metrics_summary.csv", SUMMARY_FIELDS, summary)
        write_csv(
            self.out / "metrics_summary_by_class.csv", CLASS_SUMMARY_FIELDS, summarize_by_class(self.out, all_rows)
        )
        from .metrics.base import direction_of

        res = EvalSummary(self.out, rows=[r for r in summary if r["metric"] in names])  # this run's metrics
        res.directions = {r["metric"]: direction_of(r["metric"]) for r in summary} | self.directions
        res.plots = self._write_curves(summary)
        if self.sanity_rows:
            from .metrics.sanity import write_sanity

            res.plots += write_sanity(self.out, self.sanity_rows)
        self.result = res

    def _write_curves(self, summary: list[dict]) -> list[Path]:
        means = {k: (s / n, c, m) for k, (s, n, c, m) in self.curves.items() if n}
        if not means:
            return []
        lines = [
            {"metric": name, "method": key, "x": _fmt(float(a)), "mean": _fmt(float(b))}
            for (name, key), (mean, c, _) in means.items()
            for a, b in zip(c.x, mean.tolist(), strict=True)
        ]
        write_csv(self.out / "metrics_curves.csv", CURVE_FIELDS, lines)
        stat = {(r["metric"], r["method"]): r for r in summary}
        plots = []
        for name in dict.fromkeys(n for n, _ in means):
            per = [(key, *means[(n, key)]) for (n, key) in means if n == name]
            plots.append(plot_curves(self.out / f"metrics_{name}.png", name, per, stat))
        return plots


def _merge(out: Path, new: list[dict], names: set[str], replace_all: bool) -> list[dict]:
    """metrics.csv := its rows not replaced by `new` (same image/method/metric; with replace_all
    every row of the metrics in `names`) + `new`. Returns all rows."""
    keys = {(r["image"], r["method"], r["metric"]) for r in new}
    old = [
        r
        for r in read_csv(out / "metrics.csv", METRIC_FIELDS)
        if (r["image"], r["method"], r["metric"]) not in keys and not (replace_all and r["metric"] in names)
    ]
    rows = old + new
    write_csv(out / "metrics.csv", METRIC_FIELDS, rows)
    return rows


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


def class_averaged(out: Path, rows: list[dict], summary: list[dict], metrics: set[str]) -> list[dict]:
    """The summary with the mean of `metrics` taken over classes (TorchRay's pointing game): each
    image counts for the class its map explains (target_class of explanations.csv); mean = the
    mean of the per-class means, std = their std, n = the images scored."""
    from .metrics.localization import class_mean

    cls = {r["image"]: (r.get("target_class") or "").strip() for r in read_csv(out / "explanations.csv")}
    out_rows = []
    for s in summary:
        if s["metric"] in metrics:
            vals = []
            for r in rows:
                if r["metric"] == s["metric"] and r["method"] == s["method"] and cls.get(r["image"]):
                    try:
                        vals.append((cls[r["image"]], float(r["value"])))
                    except (TypeError, ValueError):
                        continue
            mean, std, _ = class_mean(vals)
            s = {**s, "mean": _fmt(mean), "std": _fmt(std), "n": sum(math.isfinite(v) for _, v in vals)}
        out_rows.append(s)
    return out_rows


def summarize_by_class(out: Path, rows: list[dict]) -> list[dict]:
    """metrics_summary.csv per class: `by` = predicted (the top-1 class of explanations.csv) and,
    when the run's target was a labels file, `by` = true (the labelled class, its target_class)."""
    from .config import is_target_word
    from .outputs import map_key, read_run_yaml

    run = read_run_yaml(out)
    target = (run.get("config") or {}).get("target")
    labelled = isinstance(target, str) and not is_target_word(target)
    multi = bool((run.get("resolved") or {}).get("multi_target"))
    by_image: dict[str, dict] = {}
    for r in read_csv(out / "explanations.csv"):
        # every method row of a map key has the same classes (metrics.csv's image is the map key)
        by_image[map_key(r["image"], r.get("target_class"), multi)] = r
    result = []
    for by, col in [("predicted", "top1")] + ([("true", "target")] if labelled else []):
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            e = by_image.get(r["image"]) or {}
            cls = (e.get(f"{col}_class") or "").strip()
            if cls.isdigit():  # rows of images without a class (a hand-made folder) are left out
                groups.setdefault((cls, e.get(f"{col}_label") or ""), []).append(r)
        for (cls, label), members in sorted(groups.items(), key=lambda kv: int(kv[0][0])):
            result += [{"by": by, "class": cls, "label": label, **s} for s in summarize(members)]
    return result


def plot_curves(path: Path, metric: str, per_method: list, stat: dict) -> Path:
    """One figure: the mean curve of each method, its AUC/AOPC (mean over images) in the legend and title."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    parts = []
    for key, mean, curve, _ in per_method:
        s = stat.get((metric, key))
        score = f"{float(s['mean']):.3f}" if s else "?"
        ax.plot(curve.x, mean.numpy(), label=f"{key} ({curve.score_label} {score})", linewidth=1.8)
        parts.append(f"{key} {score}")
    _, _, first, metric_obj = per_method[0]
    ax.set_xlabel(first.xlabel)
    ax.set_ylabel(first.ylabel)
    better = "lower" if metric_obj.direction == "lower" else "higher"
    ax.set_title(f"{metric} ({better} is better)\n{first.score_label}: " + ", ".join(parts), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="method")
    return save_figure(fig, path)
