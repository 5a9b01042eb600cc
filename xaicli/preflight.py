"""`xai check` (and `xai explain --dry-run`): everything a run would need, checked in seconds.

    discover + resume plan (read only) -> build the model, load its weights (offline-aware,
    models/hub.py) -> bind every method on one dummy forward (layers resolved and validated) ->
    read the labels and annotation files -> time one forward and one forward+backward of one
    image -> the plan: images to do / up to date, methods, and the expected cost.

The cost of a method per image is its spec's `cost` (docs/methods.md: "F + n_steps x (F + B)")
evaluated with the spec's parameters (and the few quantities that depend on the model: K channels
of the layer, P occlusion positions), in forwards F and backwards B; with the measured seconds of
one F and one B that gives seconds per image. It is a rough figure: timed at batch size 1 on a
dummy input, without decoding, writing or metrics; batches usually make the device faster per
image. Writes nothing.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig
from .data import discover
from .errors import XaiError
from .methods import build_method, make_context
from .methods.base import MethodSpec, eval_mode, prepare_context
from .models.registry import load_model_cfg, resolve_device
from .ops import Chunker
from .state import config_hash, make_plan, parse_shard, shard_of

DEFAULT_BUDGET_HOURS = 8.0


@dataclass
class MethodCheck:
    key: str
    name: str
    cost: str  # the spec's cost expression
    forwards: float = 0.0  # per image
    backwards: float = 0.0
    seconds_per_image: float | None = None
    layer: str | None = None
    error: str | None = None


@dataclass
class CheckReport:
    out: Path
    config_hash: str
    images: int = 0
    todo: int = 0
    up_to_date: int = 0
    ignored: int = 0
    replaces_config: bool = False
    todo_paths: list[str] = field(default_factory=list)
    model: str = ""
    device: str = ""
    classes: int = 0
    input_size: tuple[int, int] = (0, 0)
    load_seconds: float = 0.0
    forward_s: float = 0.0  # measured, one image
    backward_s: float = 0.0  # measured (forward+backward minus forward), one image
    methods: list[MethodCheck] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    labels: dict | None = None
    annotations: dict | None = None
    budget_hours: float = DEFAULT_BUDGET_HOURS
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        return sum(m.seconds_per_image or 0.0 for m in self.methods)

    @property
    def estimate_seconds(self) -> float:
        return self.seconds_per_image * self.todo

    @property
    def exit_code(self) -> int:
        return 2 if self.errors else (1 if self.warnings else 0)

    def to_json(self) -> dict:
        return {
            "command": "check",
            "exit_code": self.exit_code,
            "out": str(self.out),
            "config_hash": self.config_hash,
            "images": self.images,
            "todo": self.todo,
            "up_to_date": self.up_to_date,
            "ignored": self.ignored,
            "replaces_config": self.replaces_config,
            "model": self.model,
            "device": self.device,
            "classes": self.classes,
            "input_size": list(self.input_size),
            "load_seconds": round(self.load_seconds, 3),
            "forward_seconds": round(self.forward_s, 5),
            "backward_seconds": round(self.backward_s, 5),
            "methods": [
                {
                    "key": m.key,
                    "name": m.name,
                    "cost": m.cost,
                    "forwards": m.forwards,
                    "backwards": m.backwards,
                    "seconds_per_image": None if m.seconds_per_image is None else round(m.seconds_per_image, 5),
                    "layer": m.layer,
                    "error": m.error,
                }
                for m in self.methods
            ],
            "metrics": self.metrics,
            "labels": self.labels,
            "annotations": self.annotations,
            "estimate_seconds": round(self.estimate_seconds, 1),
            "budget_hours": self.budget_hours,
            "warnings": self.warnings,
            "errors": self.errors,
        }


# ----------------------------------------------------------------------------------------------
# cost expressions: "F + n_steps x (F + B)" -> (forwards, backwards)
# ----------------------------------------------------------------------------------------------
class _FB:
    """A linear combination a*F + b*B (what a cost expression evaluates to)."""

    def __init__(self, f: float = 0.0, b: float = 0.0):
        self.f, self.b = f, b

    def __add__(self, o):
        o = o if isinstance(o, _FB) else _FB(float(o))
        return _FB(self.f + o.f, self.b + o.b)

    __radd__ = __add__

    def __sub__(self, o):
        return self + (-1 * o)

    def __mul__(self, k):
        return _FB(self.f * float(k), self.b * float(k))

    __rmul__ = __mul__


def _numbers(spec: MethodSpec) -> dict[str, float]:
    """The spec's numeric parameters by name, and `n_<name>` = the length of each list parameter
    (extremal perturbation's cost counts its `areas`)."""
    out: dict[str, float] = {}
    for f in spec.params():
        v = getattr(spec, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[f.name] = float(v)
        elif isinstance(v, list | tuple):
            out[f"n_{f.name}"] = float(len(v))
    return out


def cost_of(spec: MethodSpec, known: dict[str, float] | None = None) -> tuple[float, float]:
    """(forwards, backwards) per image from the spec's `cost` and its parameters; `known` gives the
    model-dependent symbols (K, P). Raises ValueError when the expression cannot be evaluated."""
    text = spec.cost
    if not text:
        raise ValueError("the method declares no cost")
    names = {**_numbers(spec), **(known or {})}
    for sym, param in re.findall(r"\((\w+) = (\w+)\)", text):  # "(N = n_masks)": N is that parameter
        if param in names:
            names[sym] = names[param]
    if "(the base method)" in text:  # smoothgrad: n_samples x its base method
        base = build_method(spec.base, **getattr(spec, "base_params", {}))
        f, b = cost_of(base, known)
        text = text.replace("(the base method)", f"({f} F + {b} B)")
    text = re.sub(r"\((?!\s*[\d.]*\s*F\b)[^()]*\)", "", text)  # comments in parentheses
    text = text.replace("head-only B", "0 B").replace(" x ", " * ")
    text = re.sub(r"(\d)\s+([FB])\b", r"\1 * \2", text)  # "2 F" -> "2 * F"
    text = re.sub(r"\bto the layer\b|\bmodified\b", "", text)
    env = {"F": _FB(1.0), "B": _FB(0.0, 1.0), **names}
    try:
        v = eval(text, {"__builtins__": {}}, env)  # the expression is the spec's own ClassVar, not user input
    except Exception as e:
        raise ValueError(f"cannot evaluate the cost '{spec.cost}' ({type(e).__name__})") from None
    v = v if isinstance(v, _FB) else _FB(float(v))
    return v.f, v.b


def _model_symbols(spec: MethodSpec, bound, ctx) -> dict[str, float]:
    known: dict[str, float] = {}
    layer = getattr(bound, "layer", None)
    if isinstance(layer, str):
        shape = ctx.adapter._output_shapes.get(layer)
        if shape is not None and len(shape) >= 3:
            known["K"] = float(shape[1] if len(shape) == 4 else shape[2])
    if getattr(spec, "n_samples", 0) is None and hasattr(spec, "n_segments"):  # kernelshap's auto: 2 M + 2048
        known["n_samples"] = float(2 * spec.n_segments + 2048)
    if hasattr(spec, "window") and hasattr(spec, "stride"):
        h, w = ctx.input_size
        per = [math.ceil((n - min(spec.window, n)) / max(1, min(spec.stride, min(spec.window, n)))) + 1 for n in (h, w)]
        known["P"] = float(per[0] * per[1])
    return known


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward_backward(model, input_size, device: torch.device, reps: int = 3) -> tuple[float, float]:
    """(seconds of one forward, seconds of one backward to the input) for one image, the best of
    `reps` after a warm-up. The backward counts at least one forward's time (on a busy machine the
    difference of two timings can come out near zero)."""
    x = torch.randn(1, 3, *input_size, device=device)

    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out.float().reshape(out.shape[0], -1)[:, 0].sum(), xi)

    best = []
    for fn in (fwd, fwd_bwd):
        fn()  # warm-up (cudnn autotune, lazy init)
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    return best[0], max(best[0], best[1] - best[0])


# ----------------------------------------------------------------------------------------------
def preflight(
    cfg: RunConfig,
    *,
    force: bool = False,
    limit: int | None = None,
    shard: str | None = None,
    budget_hours: float = DEFAULT_BUDGET_HOURS,
) -> CheckReport:
    """Check what a run of `cfg` needs and estimate its cost; writes nothing. Model errors (unknown
    spec, weights not available) raise; problems of methods, labels and annotations are collected."""
    disc = discover(cfg.input.path, cfg.input.recursive)
    items = disc.items
    sh = parse_shard(shard)
    if sh is not None:
        items = [it for it in items if shard_of(it.rel, sh[1]) == sh[0]]
    out = Path(cfg.output)
    chash = config_hash(cfg)
    plan = make_plan(out, items, cfg, chash, force)
    todo = plan.limited(limit)
    rep = CheckReport(out=out, config_hash=chash, budget_hours=budget_hours)
    rep.images, rep.todo, rep.up_to_date, rep.ignored = len(items), len(todo), plan.up_to_date, disc.ignored
    rep.replaces_config = plan.replace_config
    rep.todo_paths = [str(items[i].path) for i in todo]
    if plan.replace_config and not force:
        rep.errors.append(f"{out} holds the outputs of another config; --force replaces them")

    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    lm = load_model_cfg(cfg.model, device)
    rep.load_seconds = time.perf_counter() - t0
    rep.model, rep.device = cfg.model.name, str(device)
    rep.classes, rep.input_size = len(lm.class_names), tuple(lm.preprocess.input_size)
    ctx = make_context(lm, chunker=Chunker(), layer=cfg.model.layer)
    with eval_mode(lm.model):
        # timed on what the methods run on: the prepared copy (BatchNorm folded) unless fold_bn: false
        timed = prepare_context(ctx, warn=rep.warnings.append)[0].model if cfg.fold_bn else lm.model
        rep.forward_s, rep.backward_s = time_forward_backward(timed, rep.input_size, device)
        _check_methods(cfg, ctx, rep)
    _check_targets(cfg, disc, lm, [items[i] for i in todo], rep)
    _check_metrics(cfg, disc, rep)
    budget = budget_hours * 3600
    if rep.todo and rep.estimate_seconds > budget:
        worst = max((m for m in rep.methods if m.seconds_per_image), key=lambda m: m.seconds_per_image, default=None)
        why = f"; most of it is {worst.key} ({worst.cost})" if worst else ""
        rep.warnings.append(
            f"estimated {human_seconds(rep.estimate_seconds)} for {rep.todo} image(s) exceeds the budget of "
            f"{budget_hours:g} h{why}: lower its parameters, --limit the images or raise --budget"
        )
    return rep


def _check_methods(cfg: RunConfig, ctx, rep: CheckReport) -> None:
    for key, spec in cfg.specs():
        mc = MethodCheck(key, spec.name, spec.cost)
        try:
            bound = spec.bind(ctx)
            mc.layer = bound.resolved().get("layer")
        except XaiError as e:
            mc.error = str(e)
            rep.errors.append(f"method {key}: {e}")
            rep.methods.append(mc)
            continue
        try:
            mc.forwards, mc.backwards = cost_of(spec, _model_symbols(spec, bound, ctx))
            mc.seconds_per_image = mc.forwards * rep.forward_s + mc.backwards * rep.backward_s
        except ValueError as e:
            rep.warnings.append(f"method {key}: no cost estimate ({e})")
        rep.methods.append(mc)


def _check_targets(cfg: RunConfig, disc, lm, work, rep: CheckReport) -> None:
    if not isinstance(cfg.target, str) or cfg.target == "predicted":
        if isinstance(cfg.target, int) and cfg.target >= rep.classes:
            rep.errors.append(f"target: class {cfg.target} is out of range (the model has {rep.classes} classes)")
        return
    from .explain_run import class_index, load_labels

    if not Path(cfg.target).is_file():  # a class name
        try:
            rep.labels = {"class": cfg.target, "index": class_index(cfg.target, lm)}
        except XaiError as e:
            rep.errors.append(str(e))
        return
    try:
        labels = load_labels(cfg.target, disc, lm)
    except XaiError as e:
        rep.errors.append(str(e))
        return
    missing = sum(1 for it in work if it.rel not in labels)
    rep.labels = {
        "file": cfg.target,
        "listed": len(work) - missing,
        "missing": missing,
        "fallback": cfg.target_fallback,
    }
    if missing and cfg.target_fallback == "error":
        rep.warnings.append(
            f"target: the labels file lists {len(work) - missing} of the {len(work)} image(s) to do; the other "
            f"{missing} will fail (target_fallback: predicted explains their predicted class)"
        )


def _check_metrics(cfg: RunConfig, disc, rep: CheckReport) -> None:
    rep.metrics = [m.name for m in cfg.metrics]
    if not cfg.metrics and not cfg.annotations:
        return
    from .metrics import build_metrics, load_annotations

    try:
        metrics = build_metrics(cfg.metrics, [k for k, _ in cfg.specs()])
        ann = load_annotations(cfg.annotations, metrics)
    except XaiError as e:
        rep.errors.append(str(e))
        return
    if ann is not None:
        from .data import side_keys

        boxes = getattr(ann, "boxes", {})
        n = sum(1 for it in disc.items if any(k in boxes for k in side_keys(it.rel, it.path, disc.root)))
        rep.annotations = {"file": cfg.annotations, "images_with_boxes": n, "images": len(disc.items)}
        if n == 0:
            rep.warnings.append(f"annotations: {cfg.annotations} has boxes for none of the {len(disc.items)} images")


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
