"""The method contract: a registered parameter spec, bound once per model.

    spec = build_method("gradcam", layer=None)   # a dataclass: validated, picklable, no model state
    bound = spec.bind(ctx)                       # owns the resolved layer, head, mean/std, ...
    res = bound(x, target)                       # Result: maps, logits, target, declared extras

`ctx` (a `Context`) carries the model, its `ModelAdapter` (layers, head, token grids), the
preprocessing (mean/std, input size), the run's `Chunker` (inner loops with out-of-memory
back-off) and the config's layer override. A spec declares what it returns beyond the map:
`extras` (per-image CSV columns, e.g. IG's `delta`) and `map_names` (K named maps per image,
[B, K, H, W], stored as OUT/<method>/<rel>/<name>.png|.npy). Adding a method is one file: a spec
dataclass with `@register(name, description)` and the `BoundMethod` subclass that computes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import MethodError
from ..models.adapter import ModelAdapter
from ..objectives import OBJECTIVES, get_objective
from ..ops import Chunker
from ..registry import build_registered, public_fields, registrar

METHODS: dict[str, type[MethodSpec]] = {}

register = registrar(METHODS)  # @register(name, one-line description) on a MethodSpec dataclass


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (BatchNorm in train mode couples the images of a batch); restore after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def select_target(logits: Tensor, target: Tensor | int | None) -> Tensor:
    """LongTensor [B]: the predicted class when target is None, else the given class(es)."""
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return target.to(device=logits.device, dtype=torch.long).reshape(-1)


def check_target(target: Tensor, num_classes: int) -> None:
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise MethodError(f"target class out of range: the model has {num_classes} classes (0..{num_classes - 1})")


@dataclass
class Context:
    """What a spec binds to: one model and what is known about it."""

    model: nn.Module
    adapter: ModelAdapter
    mean: tuple[float, ...] | None = None  # the model's input normalisation, when known
    std: tuple[float, ...] | None = None
    preprocess: Any = None  # models.preprocess.Preprocess, when known (IG's image baseline)
    chunker: Chunker = field(default_factory=Chunker)
    layer: str | None = None  # the config's `model.layer`: CAM methods without their own `layer`
    probability: str = "softmax"  # softmax | sigmoid (`score: sigmoid`): the metrics' class probability
    # the model as loaded when `model` is the run's prepared copy (BatchNorm folded into the convs,
    # models/fold.py); the sanity metric randomises this one, as the user's model has BatchNorms
    unprepared: nn.Module | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.adapter.input_size

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def with_model(self, model: nn.Module) -> Context:
        """The same context for another model of the same architecture (sanity's randomized copy)."""
        return dataclasses.replace(self, model=model, adapter=ModelAdapter(model, self.input_size))


def make_context(model, input_size=None, chunker: Chunker | None = None, layer: str | None = None) -> Context:
    """A Context for an nn.Module or a LoadedModel (which brings its preprocessing)."""
    net = getattr(model, "model", model)
    pre = getattr(model, "preprocess", None)
    size = tuple(input_size or (pre.input_size if pre is not None else (224, 224)))
    return Context(
        model=net,
        adapter=ModelAdapter(net, size),
        mean=tuple(pre.mean) if pre is not None else None,
        std=tuple(pre.std) if pre is not None else None,
        preprocess=pre,
        chunker=chunker or Chunker(),
        layer=layer,
    )


@dataclass
class Result:
    """What a bound method returns for a batch (all on the batch's device)."""

    maps: Tensor  # [B, H, W] float32, unnormalised; [B, K, H, W] for specs with map_names
    logits: Tensor | None = None  # [B, classes] of the clean batch, detached (saves the engine a forward)
    target: Tensor | None = None  # [B] the classes explained
    extras: dict[str, Tensor] = field(default_factory=dict)  # the spec's declared per-image values [B]


class BoundMethod:
    """A spec bound to one model. Subclasses set up in `setup` and compute in `compute`."""

    def __init__(self, spec: MethodSpec, ctx: Context):
        self.spec = spec
        self.ctx = ctx
        self.model = ctx.model
        self.setup()

    def setup(self) -> None:
        """Resolve what depends on the model (layer, head, ...); runs once, at bind time. The
        default resolves the spec's `objective` field, when it has one, into `self.objective`."""
        if isinstance(getattr(self.spec, "objective", None), str):
            self.objective = objective_of(self.spec.objective)

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        raise NotImplementedError

    def __call__(self, x: Tensor, target: Tensor | int | None = None) -> Result:
        if isinstance(target, int):
            target = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
        res = self.compute(x, target)
        undeclared = set(res.extras) - set(self.spec.extras)
        if undeclared:
            raise MethodError(f"method '{self.spec.name}' returned undeclared extras {sorted(undeclared)}")
        return res

    def resolved(self) -> dict:
        """What binding decided, for run.yaml (e.g. {'layer': 'bn2'})."""
        return {}

    def loop(self, name: str) -> tuple[str, int]:
        """The chunker key of one of this bound method's inner loops (its sizes are its own)."""
        return (name, id(self))

    def rebind(self, model: nn.Module) -> BoundMethod:
        return self.spec.bind(self.ctx.with_model(model))


@dataclass
class MethodSpec:
    """Base class of the registered parameter specs (dataclass fields = parameters)."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    bound: ClassVar[type[BoundMethod]] = BoundMethod
    needs_layer: ClassVar[bool] = False  # reads a layer (CAM family): run.yaml records it
    extras: ClassVar[dict[str, str]] = {}  # per-image CSV columns it adds: name -> meaning
    map_names: ClassVar[tuple[str, ...]] = ()  # K named maps per image; () = one map
    path_params: ClassVar[tuple[str, ...]] = ()  # parameters that may hold a file path (rebased, hashed)
    cost: ClassVar[str] = ""  # in forwards (F) and backwards (B) per image, for docs/methods.md
    # how its overlay is scaled (ops.MAP_KINDS): "positive" (min-max, CAM-like), "magnitude"
    # (gradient magnitudes: percentile-clipped), "signed" (diverging colormap centred at zero)
    map_kind: ClassVar[str] = "positive"
    # may run on the run's prepared copy of the model (eval BatchNorm folded into the convs,
    # bind_methods); False: on the model as loaded (LRP canonizes a copy of its own)
    prepared_model: ClassVar[bool] = True
    # parameters the contract tests (tests/test_contracts.py) use instead of the defaults, for
    # methods whose paper defaults (thousands of forwards) are too slow to run there many times
    contract_params: ClassVar[dict[str, object]] = {}

    def bind(self, ctx: Context) -> BoundMethod:
        return type(self).bound(self, ctx)

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return public_fields(cls)

    @classmethod
    def file_params(cls, params: dict) -> dict[str, str]:
        """{key: value} of the parameters in `params` that name files (config rebasing, hash)."""
        return {k: v for k, v in params.items() if k in cls.path_params and looks_like_path(v)}


def hooked_layers(spec: MethodSpec, ctx: Context) -> set[str]:
    """Layers `spec` may hook when bound to `ctx`: its `*layer*` parameters, else the config's
    `model.layer` and the adapter's default layer (CAM family)."""
    names = {v for f in dataclasses.fields(spec) if "layer" in f.name and isinstance(v := getattr(spec, f.name), str)}
    if not names and (spec.needs_layer or any(f.name == "layer" for f in dataclasses.fields(spec))):
        names.add(ctx.layer or ctx.adapter.default_layer())
    return names


@dataclass
class Bound:
    """What bind_methods made: the bound methods, the context the metrics use (the prepared model,
    with the loaded one as `unprepared`) and, for run.yaml, what the preparation did."""

    methods: dict[str, BoundMethod]
    ctx: Context
    fold_bn: dict


def _warn(line: str) -> None:
    import sys

    print(f"warning: {line}", file=sys.stderr)


def prepare_context(ctx: Context, keep: set[str] = frozenset(), warn=_warn):
    """(the context on the prepared model, models.fold.FoldReport): a copy of ctx.model with each
    eval-mode BatchNorm folded into the conv feeding it (convs whose output a layer in `keep`
    shows are not folded), verified on a probe batch; when the check fails, `ctx` itself and one
    warning line. The prepared context keeps the loaded model as `unprepared`."""
    from ..models.fold import fold_batchnorm

    rep = fold_batchnorm(ctx.model, ctx.input_size, set(keep))
    if not rep.applied:
        if rep.failed:
            warn(f"fold_bn: {rep.note}")
        return ctx, rep
    adapter = ModelAdapter(rep.model, ctx.input_size)
    if "_default_layer" in vars(ctx.adapter):  # the same default layer by name (resolved on the loaded model)
        adapter.__dict__["_default_layer"] = ctx.adapter.default_layer()
    return dataclasses.replace(ctx, model=rep.model, adapter=adapter, unprepared=ctx.model), rep


def bind_methods(specs, ctx: Context, fold_bn: bool = True, warn=_warn) -> Bound:
    """Bind every (key, spec) once, on the run's prepared model when `fold_bn` (prepare_context;
    the convs whose output a method hooks, such as a CAM layer `conv_head`, stay unfolded); specs
    with `prepared_model = False` (LRP) and a method that turns out to hook a folded conv bind to
    the model as loaded."""
    specs = list(specs)
    prep = [(k, s) for k, s in specs if s.prepared_model]
    if not fold_bn or not prep:
        why = "fold_bn: false" if not fold_bn else "no method runs on a prepared model"
        return Bound({k: s.bind(ctx) for k, s in specs}, ctx, {"applied": False, "note": why})
    pctx, rep = prepare_context(ctx, set().union(*(hooked_layers(s, ctx) for _, s in prep)), warn)
    info = rep.summary()
    if not rep.applied:
        return Bound({k: s.bind(ctx) for k, s in specs}, ctx, info)
    folded_convs = {c for c, _ in rep.folded}
    methods, unprepared = {}, []
    for key, spec in specs:
        b = spec.bind(pctx) if spec.prepared_model else spec.bind(ctx)
        layer = b.resolved().get("layer")
        if spec.prepared_model and (layer in folded_convs if isinstance(layer, str) else bool(layer)):
            b = spec.bind(ctx)  # it hooks a conv that was folded (a layer named by a file): the loaded model
        if b.model is not rep.model:
            unprepared.append(key)
        methods[key] = b
    if unprepared:
        info["unprepared"] = unprepared
    return Bound(methods, pctx, info)


def looks_like_path(v) -> bool:
    from ..ops import REFERENCES

    return isinstance(v, str) and v not in REFERENCES and ("/" in v or "\\" in v or "." in v)


def check_objective_field(owner: str, name: str) -> None:
    if name not in OBJECTIVES:
        raise MethodError(f"{owner}: unknown objective '{name}' (allowed: {', '.join(sorted(OBJECTIVES))})")


def objective_of(name: str, negate: bool = False):
    fn = get_objective(name)
    return (lambda logits, target: -fn(logits, target)) if negate else fn


def build_method(name: str, **params) -> MethodSpec:
    """Validate `params` against the method's dataclass fields and build its spec."""
    return build_registered(METHODS, "method", name, params, MethodError)


def explain(
    model, x: Tensor, method: str | MethodSpec = "gradcam", target=None, output_index: int | str | None = None, **params
) -> Tensor:
    """Python API: maps [B, H, W] for a preprocessed batch `x` (on the model's device).

    `model` is an nn.Module or the LoadedModel from `load_model`; its forward must return the
    logits [B, classes]; for a model that returns more (a tuple, a dict, an output object) name
    the logits with `output_index` (a position such as 0, or a key/attribute such as "logits").
    `target` is None (predicted class), an int, or a LongTensor [B]; `params` are the method's
    parameters.
    """
    from ..hooks import describe_output, select_output

    spec = method if isinstance(method, MethodSpec) else build_method(method, **params)
    ctx = make_context(model, tuple(x.shape[-2:]))
    with eval_mode(ctx.model), select_output(ctx.model, output_index):
        try:
            return spec.bind(ctx)(x, target).maps
        except Exception as e:
            with torch.no_grad():
                try:
                    what = describe_output(ctx.model(x[:1]))
                except Exception:
                    what = None
            if what is None:
                raise
            hint = " (or pass output_index=... for a model that returns several outputs)"
            if output_index is None:
                hint = (
                    ': pass output_index=0 (the position of the logits) or output_index="logits" (a key or attribute)'
                )
            raise MethodError(
                f"the model's forward returned {what}; xaicli needs the logits, a tensor [B, classes]{hint}"
            ) from e
