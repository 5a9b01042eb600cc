"""`xai report OUT`: a run as a static HTML page, and the comparison sheets it shows.

    OUT/sheets/<rel>.png              one row per image: the original, then each method's overlay,
                                      captioned (method, class, probability, status)
    OUT/report/index.html             run header, metric summary (mean curves, per-class means),
                                      sanity plots, the image table, a detail view, errors.csv
    OUT/report/data.js                the table's rows (one per image), loaded with <script src>
    OUT/report/thumbs/<key>/<rel>.jpg thumbnails of the originals (`_original`) and the overlays

Reads the output folder only through reader.RunFolder. The page needs no network (no CDN, fonts
or scripts from elsewhere) and works from file:// and from a static web server serving OUT: it
references files under OUT/report and OUT by relative paths only. The table is drawn by a few
lines of plain JS from data.js, one page of rows at a time, so 10,000 images stay usable; the
state (sort, filters, page, detail image) lives in the URL's #fragment. Thumbnails and sheets
are written once and skipped while they are newer than their sources.

Layer: with the wirings (explain_run, evaluate); the CLI calls it after a run (`--report`).
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .images import load_image
from .outputs import CORE_FIELDS, atomic_write_bytes, font_of, save_png
from .reader import RunFolder
from .sinks import caption_of, summarize

REPORT_DIR = "report"
THUMB_H = 96  # px, thumbnails in the table
SHEET_H = 224  # px, cell height of a comparison sheet
PAGE_SIZE = 50  # table rows per page
ERRORS_SHOWN = 1000  # errors.csv rows in the page (all of them are in the CSV)


@dataclass
class ReportSummary:
    out: Path
    index: Path
    images: int = 0
    methods: list[str] = field(default_factory=list)
    errors: int = 0
    sheets_written: int = 0
    thumbs_written: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# files written once
# --------------------------------------------------------------------------------------------
def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return -1.0


def _up_to_date(target: Path, sources: list[Path]) -> bool:
    t = _mtime(target)
    return t >= 0 and all(_mtime(s) <= t for s in sources)


def _open_rgb(p: Path) -> Image.Image | None:
    try:
        return load_image(p)
    except Exception:  # a source deleted or unreadable since the run: no picture, the row stays
        return None


def _fit(img: Image.Image, h: int, max_w: int) -> Image.Image:
    w = max(1, round(img.width * h / max(img.height, 1)))
    if w > max_w:
        w, h = max_w, max(1, round(img.height * max_w / max(img.width, 1)))
    return img.resize((w, h), Image.BILINEAR)


def write_sheet(run: RunFolder, image: str, rows: dict[str, dict], force: bool = False) -> bool:
    """OUT/sheets/<rel>.png: the original, then each method's overlay, each with a caption.
    Returns True when written (False: up to date, or nothing to draw)."""
    target = run.sheet_file(image)
    src = Path(next(iter(rows.values()))["path"])
    overlays = {m: run.overlay_file(m, image) for m in rows}
    if not force and _up_to_date(target, [src, run.out / "explanations.csv", *overlays.values()]):
        return False
    cells: list[tuple[str, Image.Image | None]] = []
    orig = _open_rgb(src)
    cells.append((f"original: {image}", orig))
    for m, r in rows.items():
        ov = _open_rgb(overlays[m]) if r["status"] == "ok" else None
        cells.append((caption_of(r) if r["status"] == "ok" else f"{m}: {r['status']} (no map)", ov))
    if orig is None and all(c is None for _, c in cells):
        return False
    cap_h, pad = 22, 6
    fitted = [(t, _fit(c, SHEET_H, SHEET_H * 2) if c is not None else None) for t, c in cells]
    widths = [c.width if c is not None else SHEET_H for _, c in fitted]
    widths = [max(w, 200) for w in widths]
    sheet = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), SHEET_H + cap_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = font_of(13)
    x = pad
    for (text, cell), w in zip(fitted, widths, strict=True):
        while draw.textlength(text, font=font) > w and len(text) > 4:
            text = text[:-2].rstrip() + "…" if not text.endswith("…") else text[:-3] + "…"
        draw.text((x, pad), text, fill=(20, 20, 20), font=font)
        if cell is None:
            draw.rectangle([x, pad + cap_h, x + w - 1, pad + cap_h + SHEET_H - 1], fill=(225, 225, 225))
        else:
            sheet.paste(cell, (x + (w - cell.width) // 2, pad + cap_h))
        x += w + pad
    target.parent.mkdir(parents=True, exist_ok=True)
    save_png(target, np.asarray(sheet))
    return True


def write_sheets(out: str | Path, force: bool = False) -> int:
    """Comparison sheets of every image of the run (`sheet: true`, `--sheet`); returns how many were written."""
    run = RunFolder(out)
    return sum(write_sheet(run, image, rows, force) for image, rows in run.latest().items())


def _thumb(src: Path, dst: Path) -> int:
    """A THUMB_H-high JPEG of src unless dst is up to date; 1 when written."""
    if _up_to_date(dst, [src]) or not src.is_file():
        return 0
    img = _open_rgb(src)
    if img is None:
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    _fit(img, THUMB_H, THUMB_H * 3).save(buf, format="JPEG", quality=80)
    atomic_write_bytes(dst, buf.getvalue())
    return 1


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------
def _rel(p: Path, base: Path) -> str:
    """A relative URL (percent-encoded: an image named 'a#1.jpg' stays a file, not a fragment)."""
    from urllib.parse import quote

    return quote(Path(os.path.relpath(p, base)).as_posix())


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _rows_for_js(run: RunFolder, rdir: Path, latest: dict, metrics: dict, counts: dict) -> list[dict]:
    out = []
    for image, per in latest.items():
        first = next(iter(per.values()))
        src = Path(first["path"])
        th = rdir / "thumbs" / "_original" / (image + ".jpg")
        counts["thumbs"] += _thumb(src, th)
        row = {
            "i": image,
            "k": first["top1_class"],
            "c": first["top1_label"],
            "p": _num(first["top1_prob"]),
            "tk": first["target_class"],
            "tc": first["target_label"],
            "tp": _num(first["target_prob"]),
            "th": _rel(th, rdir) if th.is_file() else None,
            "sh": _rel(run.sheet_file(image), rdir) if run.sheet_file(image).is_file() else None,
            "m": {},
        }
        for m, r in per.items():
            ov = run.overlay_file(m, image)
            tm = rdir / "thumbs" / m / (image + ".jpg")
            if r["status"] == "ok":
                counts["thumbs"] += _thumb(ov, tm)
            extras = {k: v for k, v in r.items() if k not in _CORE and v not in ("", None)}
            row["m"][m] = {
                "s": r["status"],
                "th": _rel(tm, rdir) if r["status"] == "ok" and tm.is_file() else None,
                "ov": _rel(ov, rdir) if r["status"] == "ok" and ov.is_file() else None,
                "lo": _num(r["map_min"]),
                "hi": _num(r["map_max"]),
                "sec": _num(r["seconds"]),
                "x": extras,
                "v": metrics.get((image, m), {}),
            }
        out.append(row)
    return out


_CORE = set(CORE_FIELDS)  # explanations.csv columns that are not a method's declared extras


def write_report(out: str | Path, sheets: bool = True) -> ReportSummary:
    """Write OUT/report/index.html (+ data.js, thumbnails; with `sheets`, the comparison sheets)."""
    t0 = time.perf_counter()
    run = RunFolder(out)
    rdir = run.out / REPORT_DIR
    rdir.mkdir(parents=True, exist_ok=True)
    latest = run.latest()
    summary = ReportSummary(out=run.out, index=rdir / "index.html")
    if sheets:
        summary.sheets_written = sum(write_sheet(run, image, rows) for image, rows in latest.items())
    metrics: dict[tuple[str, str], dict] = {}
    metric_keys: dict[str, None] = {}
    for r in run.metrics():
        # a method with named maps is scored per map ("<method>/<name>"): shown under its method
        method, _, name = r["method"].partition("/")
        key = f"{r['metric']}/{name}" if name else r["metric"]
        metrics.setdefault((r["image"], method), {})[key] = _num(r["value"])
        metric_keys[key] = None
    counts = {"thumbs": 0}
    rows = _rows_for_js(run, rdir, latest, metrics, counts)
    summary.thumbs_written = counts["thumbs"]
    from .metrics.base import direction_of

    directions = {k: direction_of(k.split("/")[0]) for k in metric_keys}
    methods = list(run.methods) or sorted({m for per in latest.values() for m in per})
    data = {"methods": methods, "metrics": list(metric_keys), "directions": directions, "rows": rows, "page": PAGE_SIZE}
    js = "window.XAI_DATA = " + json.dumps(data, separators=(",", ":"), ensure_ascii=True) + ";\n"
    atomic_write_bytes(rdir / "data.js", js.encode("utf-8"))
    errors = run.errors()
    page = _page(run, rdir, latest, methods, errors)
    atomic_write_bytes(summary.index, page.encode("utf-8"))
    summary.images, summary.methods, summary.errors = len(latest), methods, len(errors)
    summary.seconds = time.perf_counter() - t0
    return summary


def _header(run: RunFolder, latest: dict, methods: list[str], errors: list[dict]) -> str:
    cfg = run.run.get("config") or {}
    model = cfg.get("model") or {}
    model_s = model.get("name", "?") if isinstance(model, dict) else str(model)
    if isinstance(model, dict) and model.get("weights"):
        model_s += f" (weights {model['weights']})"
    params = []
    for m in cfg.get("methods") or []:
        p = {k: v for k, v in m.items() if k not in ("name", "id")}
        name = m.get("id") or m.get("name")
        layer = (run.resolved.get("layers") or {}).get(name)
        extra = (", " if p else "") + f"layer {layer}" if layer else ""
        params.append(f"{name} ({m.get('name')}{': ' if p or extra else ''}{json.dumps(p)[1:-1] if p else ''}{extra})")
    status: dict[str, dict[str, int]] = {}
    for per in latest.values():
        for m, r in per.items():
            status.setdefault(m, {}).setdefault(r["status"], 0)
            status[m][r["status"]] += 1
    last = run.last_run()
    man = run.manifest()
    v = run.versions
    items = [
        ("model", model_s),
        ("methods", "; ".join(params)),
        ("target", str(cfg.get("target", "predicted"))),
        ("input", str(run.resolved.get("input_root", (cfg.get("input") or {}).get("path", "")))),
        ("device", str(run.resolved.get("device", ""))),
        ("images", f"{len(latest)} explained, {len(errors)} failed (errors.csv)"),
        ("maps", "; ".join(f"{m}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items())) for m, c in status.items())),
        (
            "run",
            f"status {man.get('status', last.get('status', '?'))}"
            + (f", finished {last['time']}" if last.get("time") else "")
            + (f", {last['seconds']:.1f} s" if isinstance(last.get("seconds"), int | float) else ""),
        ),
        ("config hash", str(run.run.get("config_hash", ""))),
        ("versions", ", ".join(f"{k} {v[k]}" for k in ("xaicli", "torch", "torchvision", "timm", "python") if k in v)),
    ]
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(val)}</dd>" for k, val in items)
    return f'<dl class="run">{dl}</dl>'


def _metrics_section(run: RunFolder, rdir: Path) -> str:
    from .metrics.base import direction_of

    summ = run.metrics_summary() or summarize(run.metrics())  # a run killed before its summary
    if not summ and not run.plots():
        return "<p>No metrics in this run (<code>xai evaluate OUT</code> or <code>--metrics</code> adds them).</p>"
    rows = [
        [
            r["metric"],
            direction_of(r["metric"]),
            r["method"],
            f"{_num(r['mean']) or 0:.4f}",
            f"{_num(r['std']) or 0:.4f}",
            r["n"],
        ]
        for r in summ
    ]
    parts = ["<h3>Means over images</h3>", _table(["metric", "better", "method", "mean", "std", "n"], rows, "summary")]
    curves = [p for p in run.plots() if p.name.startswith("metrics_")]
    if curves:
        parts.append('<h3>Mean curves</h3><div class="plots">')
        parts += [
            f'<img src="{html.escape(_rel(p, rdir))}" alt="{html.escape(p.stem)}" loading="lazy">' for p in curves
        ]
        parts.append("</div>")
    by_class = run.metrics_summary_by_class()
    if by_class:
        crow = [
            [r["by"], f"{r['label']} ({r['class']})", r["method"], r["metric"], f"{_num(r['mean']) or 0:.4f}", r["n"]]
            for r in by_class
        ]
        parts.append(
            "<h3>Means per class</h3><p class=\"note\">predicted: the model's top-1 class; true: the labels file's class.</p>"
        )
        parts.append(_table(["by", "class", "method", "metric", "mean", "n"], crow, "byclass"))
    sanity = [p for p in run.plots() if p.name.startswith("sanity_")]
    if sanity:
        parts.append('<h3>Sanity check (cascading randomization)</h3><div class="plots">')
        parts += [
            f'<img src="{html.escape(_rel(p, rdir))}" alt="{html.escape(p.stem)}" loading="lazy">' for p in sanity
        ]
        parts.append("</div>")
    return "".join(parts)


def _errors_section(errors: list[dict], rdir: Path, out: Path) -> str:
    if not errors:
        return '<p class="ok">No failures.</p>'
    note = ""
    if len(errors) > ERRORS_SHOWN:
        note = f"<p>The first {ERRORS_SHOWN} of {len(errors)}; all are in "
        note += f'<a href="{html.escape(_rel(out / "errors.csv", rdir))}">errors.csv</a>.</p>'
    rows = [[e.get("image", ""), e.get("reason", ""), e.get("path", "")] for e in errors[:ERRORS_SHOWN]]
    return note + _table(["image", "reason", "path"], rows, "errors")


def _concepts_section(out: Path, rdir: Path) -> str:
    """OUT/concepts/ of `xai concepts tcav|extract` (docs/concepts.md), when present: "" otherwise."""
    from .outputs import read_csv

    cdir = out / "concepts"
    parts = []
    if (cdir / "tcav.csv").is_file():
        rows = [
            [r["concept"], r["layer"], f"{r['class_label']} ({r['class']})",
             f"{_num(r['score_mean']) or 0:.2f} ± {_num(r['score_std']) or 0:.2f}",
             f"{_num(r['random_mean']) or 0:.2f} ± {_num(r['random_std']) or 0:.2f}",
             f"{_num(r['p_bonferroni']) if _num(r['p_bonferroni']) is not None else float('nan'):.3g}",
             "yes" if r["significant"] == "true" else "no", f"{_num(r['cav_accuracy']) or 0:.2f}", r["random_sets"]]
            for r in read_csv(cdir / "tcav.csv", ("concept", "layer", "class", "score_mean", "significant"))
        ]  # fmt: skip
        parts.append(
            "<h3>TCAV</h3><p class=\"note\">Share of the class's images whose logit grows along the concept's CAV "
            "(mean ± std over random sets), against random-vs-random CAVs; significant: Bonferroni-corrected "
            f'two-sided t-test. <a href="{html.escape(_rel(cdir / "tcav.csv", rdir))}">tcav.csv</a></p>'
        )
        head = [
            "concept",
            "layer",
            "class",
            "TCAV score",
            "random",
            "p (Bonferroni)",
            "significant",
            "CAV acc.",
            "sets",
        ]
        parts.append(_table(head, rows, "tcav"))
        if (cdir / "tcav.png").is_file():
            parts.append(
                f'<div><img class="atlas" src="{html.escape(_rel(cdir / "tcav.png", rdir))}" alt="TCAV"></div>'
            )
    if (cdir / "concepts.csv").is_file():
        rows = [
            [r["rank"], r["concept"], f"{_num(r['importance']) or 0:.4g}", r["importance_share"], r["dominant_crops"]]
            for r in read_csv(cdir / "concepts.csv", ("concept", "rank", "importance"))
        ]
        parts.append(
            '<h3>Extracted concepts</h3><p class="note">NMF concepts of one class\'s crops, ranked by importance '
            "(gradient x coefficient); per-image maps are the <code>concept_maps</code> method in the table above. "
            f'<a href="{html.escape(_rel(cdir / "concepts.csv", rdir))}">concepts.csv</a></p>'
        )
        parts.append(_table(["rank", "concept", "importance", "share", "dominant crops"], rows, "concepts"))
        if (cdir / "atlas.png").is_file():
            parts.append(
                f'<div><img class="atlas" src="{html.escape(_rel(cdir / "atlas.png", rdir))}" alt="atlas"></div>'
            )
    return f'<section id="concepts-sec"><h2>Concepts</h2>{"".join(parts)}</section>' if parts else ""


def _page(run: RunFolder, rdir: Path, latest: dict, methods: list[str], errors: list[dict]) -> str:
    title = f"xai report: {run.out.resolve().name}"
    links = " · ".join(
        f'<a href="{html.escape(_rel(run.out / n, rdir))}">{n}</a>'
        for n in (
            "explanations.csv",
            "metrics.csv",
            "metrics_summary.csv",
            "metrics_summary_by_class.csv",
            "errors.csv",
            "run.yaml",
        )
        if (run.out / n).is_file()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{html.escape(title)}</h1><nav><a href="#">images</a> · <a href="#metrics-sec">metrics</a> · {'<a href="#concepts-sec">concepts</a> · ' if (run.out / "concepts").is_dir() else ""}<a href="#errors-sec">errors ({len(errors)})</a> · files: {links}</nav></header>
<section id="run-sec"><h2>Run</h2>{_header(run, latest, methods, errors)}</section>
<section id="images-sec">
<h2>Images</h2>
<noscript><p>The image table needs JavaScript (no network access is needed); the CSV files above hold the same data.</p></noscript>
<form id="filters" onsubmit="return false">
<label>class <select id="f-class"><option value="">all</option></select></label>
<label>method <select id="f-method"><option value="">all</option></select></label>
<label>status <select id="f-status"><option value="">any</option><option value="ok">all ok</option><option value="bad">some not ok</option></select></label>
<label>metric <select id="f-metric"><option value="">none</option></select></label>
<select id="f-op"><option value="ge">&ge;</option><option value="le">&le;</option></select>
<input id="f-value" type="number" step="any" size="6" placeholder="value">
<span id="count"></span>
</form>
<div id="table-wrap"><table id="images"><thead></thead><tbody></tbody></table></div>
<div id="pager"><button id="prev" type="button">&larr; previous</button> <span id="pageinfo"></span> <button id="next" type="button">next &rarr;</button></div>
</section>
<section id="detail" hidden></section>
<section id="metrics-sec"><h2>Metrics</h2>{_metrics_section(run, rdir)}</section>
{_concepts_section(run.out, rdir)}
<section id="errors-sec"><h2>Errors</h2>{_errors_section(errors, rdir, run.out)}</section>
<footer>Written by <code>xai report</code>; open from the disk or any static web server. Colours: non-negative maps
min-max, gradient magnitudes clipped at a high percentile, signed maps on a diverging colormap with white = 0
(docs/report.md).</footer>
<script src="data.js"></script>
<script>{_JS}</script>
</body>
</html>
"""


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px 40px;color:#1d1d1f}
header{border-bottom:1px solid #ddd;margin-bottom:8px}h1{font-size:22px;margin:14px 0 4px}h2{font-size:18px;margin:22px 0 8px}
h3{font-size:15px;margin:16px 0 6px}nav{margin-bottom:8px;color:#555}a{color:#0b5cad}
dl.run{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}dt{font-weight:600;color:#444}dd{margin:0}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #e5e5e5;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f5f5f7;position:sticky;top:0}th.sort{cursor:pointer;user-select:none}th.sort:hover{background:#e8e8ee}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.bad td{background:#fff4f4}
#images img{height:64px;display:block}#images tbody tr:hover{background:#f0f6ff}
#filters{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:6px 0 10px}#count{color:#555}
#pager{margin:10px 0}#table-wrap{overflow-x:auto}.st-ok{color:#1a7f37}.st-bad{color:#b42318;font-weight:600}
img.atlas{max-width:100%;border:1px solid #eee}.plots img{max-width:560px;width:100%;margin:4px 8px 4px 0;border:1px solid #eee}
#detail img.sheet{max-width:100%;border:1px solid #ddd}.note{color:#555;font-size:12px}.ok{color:#1a7f37}
footer{margin-top:30px;color:#666;font-size:12px}
"""

_JS = r"""
(function(){
var D=window.XAI_DATA; if(!D){document.getElementById('count').textContent='data.js is missing';return;}
var $=function(id){return document.getElementById(id);};
function esc(s){return String(s==null?'':s).replace(/[&<>"']/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c];});}
function fmt(v){return v==null?'':(Math.abs(v)>=1000||(v!==0&&Math.abs(v)<0.001)?v.toExponential(2):v.toFixed(3));}
function st(){var h={};location.hash.replace(/^#/,'').split('&').forEach(function(kv){if(!kv)return;var i=kv.indexOf('=');if(i>0)h[decodeURIComponent(kv.slice(0,i))]=decodeURIComponent(kv.slice(i+1));});return h;}
function go(ch){var h=st();for(var k in ch){if(ch[k]===''||ch[k]==null)delete h[k];else h[k]=ch[k];}
 location.hash=Object.keys(h).map(function(k){return encodeURIComponent(k)+'='+encodeURIComponent(h[k]);}).join('&');}
var classes={};D.rows.forEach(function(r){classes[r.c]=(classes[r.c]||0)+1;});
Object.keys(classes).sort().forEach(function(c){$('f-class').add(new Option(c+' ('+classes[c]+')',c));});
D.methods.forEach(function(m){$('f-method').add(new Option(m,m));D.metrics.forEach(function(k){$('f-metric').add(new Option(m+': '+k+' ('+(D.directions[k]||'')+' is better)',m+'|'+k));});});
function val(r,key){if(key==='image')return r.i;if(key==='class')return r.c;if(key==='prob')return r.p;
 var p=key.split('|'),x=r.m[p[0]];if(!x)return null;return p[1]==='status'?x.s:(x.v[p[1]]==null?null:x.v[p[1]]);}
function rowsOf(h){var m=h.method||'';return D.rows.filter(function(r){
  if(h.cls&&r.c!==h.cls)return false;
  var ms=m?[m]:D.methods;
  if(h.status==='ok'&&!ms.every(function(k){return r.m[k]&&r.m[k].s==='ok';}))return false;
  if(h.status==='bad'&&ms.every(function(k){return r.m[k]&&r.m[k].s==='ok';}))return false;
  if(h.metric&&h.value!==undefined&&h.value!==''){var v=val(r,h.metric),t=parseFloat(h.value);if(v==null||isNaN(t))return false;if(h.op==='le'?v>t:v<t)return false;}
  return true;});}
function render(){var h=st();
 $('f-class').value=h.cls||'';$('f-method').value=h.method||'';$('f-status').value=h.status||'';$('f-metric').value=h.metric||'';$('f-op').value=h.op||'ge';
 if(document.activeElement!==$('f-value'))$('f-value').value=h.value||'';
 if(h.img!==undefined){detail(h);return;}
 $('detail').hidden=true;$('images-sec').hidden=false;$('run-sec').hidden=false;
 var ms=h.method?[h.method]:D.methods,rows=rowsOf(h);
 if(h.sort){var dir=h.dir==='desc'?-1:1;rows=rows.slice().sort(function(a,b){var x=val(a,h.sort),y=val(b,h.sort);
   if(x==null&&y==null)return 0;if(x==null)return 1;if(y==null)return -1;return (x<y?-1:x>y?1:0)*dir;});}
 var n=D.page,pages=Math.max(1,Math.ceil(rows.length/n)),pg=Math.min(Math.max(1,parseInt(h.page||'1',10)||1),pages);
 function th(label,key,tip){var arrow=h.sort===key?(h.dir==='desc'?' \u25bc':' \u25b2'):'';return '<th class="sort" data-key="'+esc(key)+'" title="'+esc(tip||'sort')+'">'+esc(label)+arrow+'</th>';}
 var head='<tr><th>image</th>'+th('name','image')+th('predicted class','class')+th('probability','prob');
 ms.forEach(function(m){head+='<th>'+esc(m)+'</th>'+th(m+' status',m+'|status');D.metrics.forEach(function(k){head+=th(m+' '+k,m+'|'+k,(D.directions[k]||'')+' is better; click to sort');});});
 $('images').tHead.innerHTML=head+'</tr>';
 var body=rows.slice((pg-1)*n,pg*n).map(function(r){var bad=ms.some(function(k){return !r.m[k]||r.m[k].s!=='ok';});
  var s='<tr class="row'+(bad?' bad':'')+'" data-image="'+esc(r.i)+'"><td>'+(r.th?'<img loading="lazy" src="'+esc(r.th)+'" alt="">':'')+'</td>';
  s+='<td><a href="#img='+encodeURIComponent(D.rows.indexOf(r))+'">'+esc(r.i)+'</a></td><td>'+esc(r.c)+'</td><td class="num">'+fmt(r.p)+'</td>';
  ms.forEach(function(m){var x=r.m[m]||{s:'missing',v:{}};s+='<td>'+(x.th?'<img loading="lazy" src="'+esc(x.th)+'" alt="'+esc(m)+'">':'')+'</td>';
   s+='<td class="'+(x.s==='ok'?'st-ok':'st-bad')+'">'+esc(x.s)+'</td>';D.metrics.forEach(function(k){s+='<td class="num">'+fmt(x.v[k])+'</td>';});});
  return s+'</tr>';}).join('');
 $('images').tBodies[0].innerHTML=body;
 $('count').textContent=rows.length+' of '+D.rows.length+' images';
 $('pageinfo').textContent='page '+pg+' of '+pages;$('prev').disabled=pg<=1;$('next').disabled=pg>=pages;$('prev').dataset.p=pg-1;$('next').dataset.p=pg+1;
 Array.prototype.forEach.call(document.querySelectorAll('th.sort'),function(t){t.onclick=function(){var k=t.dataset.key;go({sort:k,dir:(h.sort===k&&h.dir!=='desc')?'desc':'asc',page:''});};});}
function detail(h){var r=D.rows[parseInt(h.img,10)];$('images-sec').hidden=true;$('run-sec').hidden=true;var d=$('detail');d.hidden=false;
 if(!r){d.innerHTML='<p>No such image. <a href="#">back to the table</a></p>';return;}
 var s='<p><a href="#" id="back">&larr; back to the table</a></p><h2>'+esc(r.i)+'</h2><p>predicted: <b>'+esc(r.c)+'</b> (class '+esc(r.k)+', p '+fmt(r.p)+')';
 if(String(r.tk)!==String(r.k))s+='; explained: <b>'+esc(r.tc)+'</b> (class '+esc(r.tk)+', p '+fmt(r.tp)+')';
 s+='</p>'+(r.sh?'<img class="sheet" src="'+esc(r.sh)+'" alt="comparison sheet">':'<p class="note">No comparison sheet (run <code>xai report</code> with sheets).</p>');
 s+='<table><thead><tr><th>method</th><th>status</th><th>raw map min</th><th>raw map max</th><th>seconds</th>';
 D.metrics.forEach(function(k){s+='<th>'+esc(k)+' ('+esc(D.directions[k]||'')+' is better)</th>';});s+='<th>other</th><th>overlay</th></tr></thead><tbody>';
 D.methods.forEach(function(m){var x=r.m[m];if(!x)return;s+='<tr><td>'+esc(m)+'</td><td class="'+(x.s==='ok'?'st-ok':'st-bad')+'">'+esc(x.s)+'</td><td class="num">'+fmt(x.lo)+'</td><td class="num">'+fmt(x.hi)+'</td><td class="num">'+fmt(x.sec)+'</td>';
  D.metrics.forEach(function(k){s+='<td class="num">'+fmt(x.v[k])+'</td>';});
  s+='<td>'+Object.keys(x.x).map(function(k){return esc(k)+' '+esc(x.x[k]);}).join(', ')+'</td><td>'+(x.ov?'<a href="'+esc(x.ov)+'">full size</a>':'')+'</td></tr>';});
 d.innerHTML=s+'</tbody></table>';window.scrollTo(0,0);}
$('f-class').onchange=function(){go({cls:this.value,page:''});};$('f-method').onchange=function(){go({method:this.value,page:''});};
$('f-status').onchange=function(){go({status:this.value,page:''});};$('f-metric').onchange=function(){go({metric:this.value,page:''});};
$('f-op').onchange=function(){go({op:this.value,page:''});};$('f-value').oninput=function(){go({value:this.value,page:''});};
$('prev').onclick=function(){go({page:this.dataset.p});};$('next').onclick=function(){go({page:this.dataset.p});};
window.addEventListener('hashchange',render);render();
})();
"""
