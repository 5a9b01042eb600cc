"""RunConfig: YAML (or flags) -> one typed, validated object.

Paths written in a config file are relative to that file's folder (so cron can run it from
anywhere); paths given as command-line flags are relative to the current directory.
Every mistake becomes a ConfigError naming the key and what is allowed (exit code 2).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError, XaiError
from .outputs import is_reserved, load_yaml

DEFAULT_OUT = "xai-out"


def check_device(v: str) -> str:
    """The `device:` value, checked (a pydantic validator for every config that has one)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
        raise ValueError("allowed: auto, cpu, cuda, cuda:N, mps")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def model_file(name: str) -> str | None:
    """The .py file of a `path/to/file.py:build` model spec, else None."""
    left, sep, fn = name.rpartition(":")
    return left if sep and fn and left.endswith(".py") else None


def _floats3(v):
    """'0.5,0.5,0.5' (a flag) or [0.5, 0.5, 0.5] -> [float, float, float]."""
    if isinstance(v, str):
        try:
            v = [float(a) for a in v.replace(" ", "").split(",") if a]
        except ValueError:
            raise ValueError("must be three numbers, e.g. 0.485,0.456,0.406") from None
    if v is not None and (not isinstance(v, list | tuple) or len(v) != 3):
        raise ValueError("must be three numbers (one per RGB channel), e.g. [0.485, 0.456, 0.406]")
    return v


# the preprocessing keys of `model:` (None: the model's own data config)
PREPROCESS_KEYS = ("input_size", "resize", "crop", "mean", "std", "interpolation")


class ModelCfg(_Strict):
    name: str = Field(
        "default",
        description="default | torchvision:NAME | timm:NAME | my_pkg.module:build | path/to/file.py:build",
    )
    weights: str | None = Field(None, description="default | none | weights name/tag | path to checkpoint")
    num_classes: int | None = Field(
        None, gt=0, le=1_000_000, strict=True, description="for checkpoints with their own head"
    )
    class_names: str | None = Field(None, description="text file, one class name per line")
    layer: str | None = Field(None, description="target layer for CAM methods (auto when empty)")
    input_size: int | list[int] | None = Field(None, description="model input, N or [H, W] pixels")
    resize: int | None = Field(None, gt=0, le=65536, strict=True, description="shorter side before the centre crop")
    crop: Literal["center", "none"] | None = Field(None, description="center | none (resize to input_size)")
    mean: list[float] | None = Field(None, description="normalisation mean, 3 numbers")
    std: list[float] | None = Field(None, description="normalisation std, 3 numbers")
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] | None = None

    @field_validator("input_size", mode="before")
    @classmethod
    def _size(cls, v):
        if isinstance(v, str):
            v = [int(a) for a in v.lower().replace("x", ",").split(",") if a.strip().isdigit()] or v
            v = v[0] if isinstance(v, list) and len(v) == 1 else v
        if isinstance(v, bool) or (isinstance(v, list) and (len(v) != 2 or any(isinstance(a, bool) for a in v))):
            raise ValueError("must be N or [H, W] (pixels)")
        sizes = [v] if isinstance(v, int) else v if isinstance(v, list) else []
        if any(isinstance(a, int) and not 8 <= a <= 16384 for a in sizes):
            raise ValueError("must be between 8 and 16384 pixels")
        return v

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _three(cls, v):
        return _floats3(v)

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v):
        if v is not None and any(not a > 0 or a != a or a == float("inf") for a in v):
            raise ValueError("every std must be a finite number > 0")
        return v

    def preprocess_overrides(self) -> dict:
        """{key: value} of the preprocessing keys that are set."""
        return {k: getattr(self, k) for k in PREPROCESS_KEYS if getattr(self, k) is not None}


class InputCfg(_Strict):
    path: str | list[str] = Field(
        description="folder, glob pattern, image file, or .txt list of paths; or a list of them"
    )
    recursive: bool = True


class MethodCfg(_Strict):
    name: str
    id: str | None = None  # output folder name; defaults to the method name
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.id or self.name


class MetricCfg(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets: 'a,b:mean=[1,2],c' -> ['a', 'b:mean=[1,2]', 'c']."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth <= 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_named_list(text: str) -> list:
    """The command-line form of methods/metrics: 'gradcam,integrated_gradients:n_steps=32,baseline=blur'
    -> ['gradcam', {name: integrated_gradients, n_steps: 32, baseline: blur}]. A `key=value` after
    `name:` belongs to that name until the next bare name; values are read as YAML scalars or
    flow lists (32, 0.5, true, [0.5, 0.5, 0.5]); `id=...` names the output folder."""
    out: list = []
    for tok in (t.strip() for t in _split_top(text)):
        if not tok:
            continue
        name, colon, rest = tok.partition(":")
        if "=" in name:  # another key=value of the previous method
            if not out or not isinstance(out[-1], dict):
                raise ValueError(f"'{tok}': a parameter needs a method before it (NAME:{tok})")
            rest, name, colon = tok, None, True
        elif colon:
            out.append({"name": name.strip()})
        else:
            out.append(name.strip())
            continue
        for kv in (x.strip() for x in _split_top(rest, ",")):
            if not kv:
                continue
            key, eq, val = kv.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"'{kv}': write parameters as key=value (e.g. n_steps=32)")
            try:
                value = yaml.safe_load(val) if val.strip() else ""
            except yaml.YAMLError:
                value = val
            out[-1][key.strip()] = value
    return out


def _named_list(v):
    """'a,b' | 'a:k=v,k2=v2,b' | [a, {name: b, param: 1}] | {name: ...} -> [{name, (id,) params}, ...]."""
    if isinstance(v, str):
        v = parse_named_list(v)
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        return v
    out = []
    for item in v:
        if isinstance(item, dict) and "params" not in item:
            item = dict(item)
            d = {"name": item.pop("name", None), "params": item}
            if "id" in item:
                d["id"] = item.pop("id")
            out.append(d)
        elif isinstance(item, str):
            out.append({"name": item})
        else:
            out.append(item)
    return out


def _check_colormap(v):
    import matplotlib

    if v is not None and v not in matplotlib.colormaps:
        raise ValueError("not a matplotlib colormap (e.g. jet, turbo, viridis, inferno, magma; diverging: bwr, RdBu_r)")
    return v


class OverlayCfg(_Strict):
    """How overlays are drawn (docs/report.md). colormap/alpha default to the top-level keys."""

    alpha: float | None = Field(None, ge=0.0, le=1.0, description="heatmap opacity (default: top-level alpha)")
    colormap: str | None = Field(None, description="for non-negative maps (default: top-level colormap)")
    diverging: str = Field("bwr", description="for signed maps, centred at zero")
    clip_percentile: float = Field(99.5, gt=50.0, le=100.0, description="percentile clipping of gradient/signed maps")
    caption: bool = Field(False, description="a strip below each overlay: method, class, probability")
    colorbar: bool = Field(False, description="a colorbar in that strip")

    @field_validator("colormap", "diverging")
    @classmethod
    def _cmaps(cls, v):
        return _check_colormap(v)


class RunConfig(_Strict):
    model: ModelCfg = Field(default_factory=ModelCfg)
    methods: list[MethodCfg] = Field(default_factory=lambda: [MethodCfg(name="gradcam")], min_length=1)
    target: str | int = "predicted"  # predicted | class index | topk:K | positives | labels.csv
    score: Literal["logit", "softmax", "sigmoid"] = "logit"  # what is explained and reported (README)
    threshold: float = Field(0.5, gt=0.0, lt=1.0, allow_inf_nan=False)  # `target: positives`: sigmoid > threshold
    # images a labels file does not list: `error` (errors.csv, exit 1) or `predicted` (explain the predicted class)
    target_fallback: Literal["error", "predicted"] = "error"
    input: InputCfg | None = None
    output: str = Field(DEFAULT_OUT, min_length=1)
    device: str = "auto"
    batch_size: int = Field(8, gt=0, le=4096, strict=True)
    workers: int = Field(2, ge=0, le=64, strict=True)
    colormap: str = "jet"
    alpha: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    max_pixels: int = Field(178_956_970, gt=0, le=2**40, strict=True)
    overlay: OverlayCfg = Field(default_factory=OverlayCfg)
    sheet: bool = False  # comparison sheets OUT/sheets/<rel>.png (original + each method's overlay)
    metrics: list[MetricCfg] = Field(default_factory=list)  # computed in the batch loop (see docs/metrics.md)
    annotations: str | None = None  # bounding boxes (CSV, JSON or Pascal VOC XML) for localization metrics
    # -- throughput (README "Speed and scale"); none of these is in the config hash ---------------
    overlay_format: Literal["png", "jpg", "webp"] = "png"  # the overlay files' format
    overlay_max_side: int | None = Field(None, ge=16, le=1 << 16, strict=True)  # None: the original size
    save_maps: Literal["npy", "npz-f16"] | Literal[False] = "npy"  # raw maps: float32 .npy, float16 .npz, none
    draft: bool = True  # JPEG: decode at a reduced DCT scale when the model input and overlay allow it
    amp: Literal["none", "bf16"] = "none"  # autocast the methods' forward/backward to bfloat16
    channels_last: bool = False  # model and batches in channels_last memory format
    # on CPU, inner loops (IG path points, SmoothGrad samples, Score-CAM/RISE masks, ...) send at most
    # this many items per forward/backward (smaller chunks run faster there: caches); null: the methods' own
    cpu_chunk: int | None = Field(16, ge=1, le=4096, strict=True)
    fold_bn: bool = True  # methods run on a copy with eval BatchNorm folded into the convs (checked; models/fold.py)
    writers: int = Field(4, ge=1, le=64, strict=True)  # threads that encode overlays and maps
    write_queue: int = Field(4, ge=1, le=1024, strict=True)  # batches in flight to the writers before the loop waits
    engine: Literal["local", "ray"] = "local"  # where batches run: this process, or Ray Data actors
    ray_address: str | None = None  # engine ray: the cluster to join (None: ray.init's default, e.g. RAY_ADDRESS)
    _specs: list = PrivateAttr(default_factory=list)  # (key, MethodSpec), built once by validation

    def specs(self) -> list:
        """[(key, MethodSpec)] of the methods, as validation built them (each spec is built once)."""
        return list(self._specs)

    # -- shorthand forms ---------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data):
        bad = _find_nul(data)
        if bad is not None:
            raise ValueError(f"'{bad}': contains a NUL byte")
        return data

    @field_validator("output")
    @classmethod
    def _output(cls, v):
        if not v.strip():
            raise ValueError("must name a folder (an empty output is refused, not replaced by the default)")
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("input", mode="before")
    @classmethod
    def _input_str(cls, v):
        if isinstance(v, list | tuple):
            if not v:
                raise ValueError("an empty list of inputs")
            return {"path": [str(x) for x in v] if len(v) > 1 else str(v[0])}
        return {"path": v} if isinstance(v, str | Path) else v

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v):
        return _named_list(v)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, v):
        return _named_list(v)

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        if isinstance(v, int):
            if v < 0:
                raise ValueError("a class index must be >= 0")
            return v
        if v.strip().isdigit():
            return int(v)
        k = topk_of(v)
        if k is not None and not 1 <= k <= 1000:
            raise ValueError("topk:K needs 1 <= K <= 1000")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        return check_device(v)

    @field_validator("colormap")
    @classmethod
    def _colormap(cls, v):
        return _check_colormap(v)

    @field_validator("save_maps", mode="before")
    @classmethod
    def _save_maps(cls, v):
        if v is False or (isinstance(v, str) and v.strip().lower() in ("false", "none", "no", "off")):
            return False
        if v not in ("npy", "npz-f16"):
            raise ValueError("allowed: npy (float32), npz-f16 (float16, compressed), false (no raw maps)")
        return v

    @field_validator("amp", mode="before")
    @classmethod
    def _amp(cls, v):
        if v is False or v is None or (isinstance(v, str) and v.strip().lower() in ("false", "none", "off", "fp32")):
            return "none"
        if v != "bf16":
            raise ValueError("allowed: bf16, none")
        return v

    @field_validator("overlay_format", mode="before")
    @classmethod
    def _overlay_format(cls, v):
        v = "jpg" if isinstance(v, str) and v.lower() == "jpeg" else v
        if v not in ("png", "jpg", "webp"):
            raise ValueError("allowed: png, jpg, webp")
        return v

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v):
        if v not in ("local", "ray"):
            raise ValueError("allowed: local, ray")
        return v

    def overlay_style(self) -> OverlayCfg:
        """The overlay section with colormap/alpha filled from the top-level keys when not set."""
        o = self.overlay
        return o.model_copy(
            update={"colormap": o.colormap or self.colormap, "alpha": self.alpha if o.alpha is None else o.alpha}
        )

    def multi_target(self) -> bool:
        """Several targets per image (topk:K with K > 1, positives, or a labels file that gives an
        image several classes): each (image, method, target) is one row and one map file
        OUT/<method>/<rel>__<class>.png|.npy (outputs.map_key)."""
        t = self.target
        if not isinstance(t, str) or t == "predicted":
            return False
        if t == "positives":
            return True
        k = topk_of(t)
        if k is not None:
            return k > 1
        return labels_multi(t)

    @model_validator(mode="after")
    def _methods_exist(self):
        from .methods import METHODS, build_method

        seen, specs = set(), []
        for i, m in enumerate(self.methods):
            params = m.params
            cls = METHODS.get(m.name)
            if self.score != "logit" and cls is not None and "objective" not in params:
                if any(f.name == "objective" for f in cls.params()):  # `score:` picks the default objective
                    params = {**params, "objective": SCORE_OBJECTIVE[self.score]}
            try:
                try:
                    specs.append((m.key, build_method(m.name, **params)))
                except XaiError:
                    if params is m.params:
                        raise
                    specs.append((m.key, build_method(m.name, **m.params)))  # a method that needs its own (cam)
            except XaiError as e:
                raise ValueError(f"methods[{i}]: {e}") from None
            if m.key in seen:
                raise ValueError(f"methods[{i}]: '{m.key}' appears twice; give one an `id:` (its output folder)")
            if "/" in m.key or "\\" in m.key or m.key.startswith("."):
                raise ValueError(f"methods[{i}]: id '{m.key}' must be a plain folder name")
            if is_reserved(m.key):
                raise ValueError(
                    f"methods[{i}]: id '{m.key}' is a name the output folder's layout uses "
                    "(run.yaml, explanations.csv, metrics_*, ...); give the method another id"
                )
            seen.add(m.key)
        from .metrics import build_metric

        names = set()
        for i, mc in enumerate(self.metrics):
            try:
                met = build_metric(mc.name, **mc.params)
            except XaiError as e:
                raise ValueError(f"metrics[{i}]: {e}") from None
            if mc.name in names:
                raise ValueError(f"metrics[{i}]: '{mc.name}' appears twice")
            names.add(mc.name)
            against = getattr(met, "against", None)
            if "reference" in met.needs and against is None:
                raise ValueError(f"metrics[{i}]: '{mc.name}' needs `against: METHOD` (one of: {', '.join(seen)})")
            if against is not None and against not in seen:
                raise ValueError(
                    f"metrics[{i}]: against '{against}' is not a method of this run (one of: {', '.join(seen)})"
                )
        self._specs = specs
        return self


SCORE_OBJECTIVE = {"logit": "logit", "softmax": "prob", "sigmoid": "sigmoid"}  # score -> methods' default objective
TARGET_WORDS = ("predicted", "positives")


def topk_of(target) -> int | None:
    """K of a `topk:K` target, else None."""
    if isinstance(target, str) and target.strip().lower().startswith("topk:"):
        k = target.split(":", 1)[1].strip()
        return int(k) if k.isdigit() else -1
    return None


def is_target_word(target) -> bool:
    """A target that is not a labels file: predicted, positives, topk:K, a class index."""
    return (
        not isinstance(target, str) or target in TARGET_WORDS or topk_of(target) is not None or target.strip().isdigit()
    )


def split_labels(cell: str) -> list[str]:
    """The classes of one labels-file cell: `cat`, or several separated by `;` or `|`."""
    return [c.strip() for c in cell.replace("|", ";").split(";") if c.strip()]


def labels_multi(path: str) -> bool:
    """Whether a labels file gives some image more than one class (several rows or `a;b`)."""
    from .outputs import read_csv

    try:
        rows = read_csv(Path(path))
    except XaiError:
        return False
    seen: dict[str, set] = {}
    for r in rows:
        cls = split_labels(r.get("class") or "")
        s = seen.setdefault((r.get("image") or "").strip(), set())
        s.update(cls)
        if len(s) > 1:
            return True
    return False


def _find_nul(v, where: str = "", depth: int = 0) -> str | None:
    """The location of the first string holding a NUL byte (paths cannot hold one)."""
    if depth > 50:
        return None
    if isinstance(v, str):
        return where or "value" if "\0" in v else None
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list | tuple) else ()
    for k, x in items:
        if isinstance(k, str) and "\0" in k:
            return f"{where}.{k}".lstrip(".")
        bad = _find_nul(x, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}".lstrip("."), depth + 1)
        if bad is not None:
            return bad
    return None


def _loc(loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def format_validation_error(e: ValidationError, source: str, model_cls=RunConfig) -> str:
    msgs = []
    for err in e.errors():
        loc = _loc([p for p in err["loc"] if p not in ("function-after[_methods_exist()]",)])
        if err["type"] == "extra_forbidden":
            parent = model_cls
            for p in err["loc"][:-1]:
                f = getattr(parent, "model_fields", {}).get(p) if isinstance(p, str) else None
                ann = getattr(f, "annotation", None) if f else None
                sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
                parent = sub[0] if sub else parent
            allowed = ", ".join(parent.model_fields)
            msgs.append(f"unknown key '{loc}' (allowed: {allowed})")
        else:
            text = err["msg"].removeprefix("Value error, ")
            where = f"'{loc}': " if loc else ""
            got = "" if err["type"] in ("value_error", "missing") else f" (got {err.get('input')!r})"
            msgs.append(f"{where}{text}{got}")
    return f"{source}: " + "; ".join(msgs)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data, dups = load_yaml(p.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    if dups:
        shown = ", ".join(f"'{k}' (line {n})" for k, n in dups[:3])
        print(f"warning: {p}: duplicate key(s) {shown}: the last one wins", file=sys.stderr)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys (model, methods, input, ...)")
    return data


def _rebase(data: dict, base: Path) -> dict:
    """Make the config file's relative paths relative to its own folder."""

    def fix(v: str) -> str:
        return v if not v.strip() or Path(v).is_absolute() else str(base / v)

    def fix_all(v):
        return [fix(x) if isinstance(x, str) else x for x in v] if isinstance(v, list) else fix(v)

    d = dict(data)
    if isinstance(d.get("input"), str | list):
        d["input"] = fix_all(d["input"])
    elif isinstance(d.get("input"), dict) and isinstance(d["input"].get("path"), str | list):
        d["input"] = {**d["input"], "path": fix_all(d["input"]["path"])}
    if isinstance(d.get("output"), str):
        d["output"] = fix(d["output"])
    if isinstance(d.get("annotations"), str):
        d["annotations"] = fix(d["annotations"])
    t = d.get("target")
    if isinstance(t, str) and not is_target_word(t):
        if looks_like_file(t) or (base / t).exists():  # a labels file, else a class name
            d["target"] = fix(t)
    if d.get("methods") is not None:
        try:
            d["methods"] = _rebase_method_paths(_named_list(d["methods"]), fix)
        except ValueError:  # a malformed 'a:k=v' string: validation says what is wrong
            pass
    if isinstance(d.get("model"), str) and model_file(d["model"]):
        d["model"] = {"name": d["model"]}
    if isinstance(d.get("model"), dict):
        m = dict(d["model"])
        f = model_file(m["name"]) if isinstance(m.get("name"), str) else None
        if f:  # path/to/file.py:build: the file is relative to the config file
            m["name"] = f"{fix(f)}:{m['name'].rpartition(':')[2]}"
        for k in ("class_names",):
            if isinstance(m.get(k), str):
                m[k] = fix(m[k])
        w = m.get("weights")
        if isinstance(w, str) and ("/" in w or w.endswith((".pt", ".pth", ".safetensors", ".bin"))):
            m["weights"] = fix(w)
        d["model"] = m
    return d


def _rebase_method_paths(methods, fix):
    """Method parameters that name files (IG's image baseline, also inside smoothgrad's
    base_params) are relative to the config file too; the spec says which (MethodSpec.file_params)."""
    from .methods import METHODS

    if not isinstance(methods, list):
        return methods
    out = []
    for item in methods:
        cls = METHODS.get(item.get("name")) if isinstance(item, dict) else None
        params = item.get("params") if isinstance(item, dict) else None
        if cls is None or not isinstance(params, dict):
            out.append(item)
            continue
        params = {**params}
        for dotted, value in cls.file_params(params).items():
            *parents, leaf = dotted.split(".")
            d = params
            for k in parents:
                d[k] = dict(d[k])
                d = d[k]
            d[leaf] = fix(value)
        out.append({**item, "params": params})
    return out


def build_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read the YAML file (if any), apply flag overrides (non-None values), validate."""
    data: dict = {}
    source = "command line"
    if path is not None:
        data = _rebase(read_yaml(path), Path(path).resolve().parent)
        source = str(path)
    for key, val in (overrides or {}).items():
        if val is None:
            continue
        if key.startswith("model."):
            m = data.get("model", {})
            m = {"name": m} if isinstance(m, str) else dict(m)
            m[key.split(".", 1)[1]] = val
            data["model"] = m
        elif key == "metrics" and isinstance(val, str):
            # --metrics NAMES: the config's parameters for the names it lists, defaults for the others
            try:
                by_name = {d["name"]: d for d in _named_list(data.get("metrics") or []) or [] if isinstance(d, dict)}
                named = _named_list(val)
            except ValueError as e:
                raise ConfigError(f"--metrics: {e}") from None
            data["metrics"] = [by_name.get(d["name"], d) if not d.get("params") else d for d in named]
        elif key == "against":
            data["metrics"] = with_against(data.get("metrics") or [], val)
        elif key == "concepts":
            data["methods"] = with_concepts(data.get("methods") or [], val, source)
        elif key == "input" and isinstance(data.get("input"), dict):
            data["input"] = {**data["input"], "path": val}
        else:
            data[key] = val
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    if cfg.input is None:
        raise ConfigError(f"{source}: no input: give a folder, glob or list file (argument or `input:` key)")
    if not is_target_word(cfg.target) and not Path(cfg.target).is_file():
        if looks_like_file(cfg.target):
            raise ConfigError(
                f"{source}: 'target': '{cfg.target}' is not 'predicted', a class index, topk:K, positives, "
                "a class name, or an existing labels file"
            )
        # else a class name ('tiger cat'), checked against the model's names when it is loaded
    return cfg


def looks_like_file(v: str) -> bool:
    """A target value meant as a labels file rather than a class name ('tiger cat')."""
    return "/" in v or "\\" in v or Path(v).suffix.lower() in (".csv", ".tsv", ".txt")


def with_against(metrics, against: str) -> list:
    """Set `against` on the metrics that compare two methods (win)."""
    from .metrics import METRICS

    out = []
    for item in _named_list(metrics) or []:
        cls = METRICS.get(item.get("name")) if isinstance(item, dict) else None
        if cls is not None and "reference" in cls.needs:
            item = {**item, "params": {**item.get("params", {}), "against": against}}
        out.append(item)
    return out


def with_concepts(methods, concepts: str, source: str = "command line") -> list:
    """Set `concepts` (a flag: relative to the current folder) on the concept_maps methods."""
    out, hit = [], False
    for item in _named_list(methods) or []:
        if isinstance(item, dict) and item.get("name") == "concept_maps":
            item, hit = {**item, "params": {**item.get("params", {}), "concepts": concepts}}, True
        out.append(item)
    if not hit:
        raise ConfigError(f"{source}: --concepts is for the concept_maps method; add `-m concept_maps`")
    return out


def dump_config(cfg: RunConfig) -> dict:
    d = cfg.model_dump(mode="json")
    d["methods"] = [{"name": m.name, **({"id": m.id} if m.id else {}), **m.params} for m in cfg.methods]
    d["metrics"] = [{"name": m.name, **m.params} for m in cfg.metrics]
    return d
