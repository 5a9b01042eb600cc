"""Model specs -> (model, preprocessing, class names).

Specs:
    default              the embedded EfficientNet-Lite0 (offline, ImageNet weights)
    torchvision:NAME     any torchvision classifier, e.g. torchvision:resnet50
    timm:NAME            any timm classifier, e.g. timm:convnext_tiny (a tag: timm:NAME.TAG)
    my_pkg.module:build  your own model: a function (importable module) that returns an nn.Module
    path/to/file.py:build   the same from a Python file (its folder is importable while it loads)

Your own model's function is called without arguments, or with `num_classes=N` when the config
sets num_classes and the function takes that parameter. Its preprocessing defaults to ImageNet's
(224 input, resize 256, centre crop, ImageNet mean/std, bilinear); the config's `model:` keys
input_size, resize, crop, mean, std, interpolation override any model's preprocessing.

Weights (`weights=`):
    None / "default"     the library's default pretrained weights (download or local cache)
    "none"               random initialisation (tests, architecture checks)
    NAME                 a torchvision weights enum name (IMAGENET1K_V2) or a timm tag
    PATH                 a local checkpoint: .safetensors, or .pt/.pth read with weights_only=True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .preprocess import Preprocess

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
OFFLINE_HINT = (
    "no network and no cached copy? Put the weights file in the cache (torch hub: "
    "~/.cache/torch/hub/checkpoints, timm/Hugging Face: ~/.cache/huggingface) or pass a local "
    "checkpoint with `weights: path/to/file.safetensors`"
)


@dataclass
class LoadedModel:
    """A classifier in eval mode with everything needed to feed it and name its classes."""

    model: nn.Module
    preprocess: Preprocess
    class_names: list[str]
    spec: str
    weights: str | None = None
    info: dict = field(default_factory=dict)

    def to(self, device) -> LoadedModel:
        self.model.to(device)
        return self

    def label(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else f"class_{index}"


def imagenet_class_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _class_names(num_classes: int, names_file: str | Path | None) -> list[str]:
    if names_file is not None:
        p = Path(names_file)
        if not p.is_file():
            raise ModelError(f"model.class_names: file not found: {p}")
        try:
            names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (UnicodeDecodeError, OSError) as e:
            raise ModelError(f"model.class_names: {p} is not a readable UTF-8 text file ({type(e).__name__})") from None
        if num_classes == 1 and len(names) == 2:  # a binary head: one logit, named by its positive class
            return names[1:]
        if len(names) != num_classes:
            raise ModelError(f"model.class_names: {p} has {len(names)} names, the model has {num_classes} classes")
        return names
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]


def _num_outputs(model: nn.Module) -> int:
    for attr in ("num_classes",):
        n = getattr(model, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else 1000


def _is_path(weights: str | None) -> bool:
    return weights is not None and (weights.lower().endswith(CHECKPOINT_SUFFIXES) or "/" in weights or "\\" in weights)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or torch.load(weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model.weights: checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:
            raise ModelError(f"model.weights: {p} is not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        from .hub import pickle_refusal

        raise ModelError(pickle_refusal(p, e)) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"model.weights: {p} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def _head_mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(key, classes in the checkpoint, classes of the model) when the checkpoint's classifier
    head has another number of classes than the built model (every other tensor fits)."""
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if not bad or set(own) != set(sd):
        return None
    heads = {k for k in bad if k.endswith((".weight", ".bias")) and sd[k].ndim in (1, 2)}
    rows = {int(sd[k].shape[0]) for k in heads}
    mine = {int(own[k].shape[0]) for k in heads}
    same_rest = all(sd[k].shape[1:] == own[k].shape[1:] for k in heads)
    if set(bad) == heads and len(rows) == 1 and len(mine) == 1 and same_rest:
        return sorted(heads, key=lambda k: (not k.endswith(".weight"), k))[0], rows.pop(), mine.pop()
    return None


def _load_checkpoint_into(model: nn.Module, path: str) -> None:
    sd = load_state_dict_file(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    head = _head_mismatch(model, sd)
    if head is not None:
        key, n, m = head
        raise ModelError(
            f"model.weights: {path} has a {n}-class head ({key}), the model was built with {m} classes: "
            f"set `num_classes: {n}` in the config's model section (or --num-classes {n})"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ModelError(f"model.weights: {path} does not fit the architecture: {msg[:300]}") from e


def _outputs_of(model: nn.Module, pre: Preprocess, spec: str) -> int:
    """Classes of your own model, from one dummy forward (which also checks what it returns)."""
    try:
        with torch.no_grad():
            y = model(torch.zeros(1, 3, *pre.input_size))
    except Exception as e:
        raise ModelError(
            f"model: {spec}: a forward pass on a [1, 3, {pre.input_size[0]}, {pre.input_size[1]}] input failed "
            f"({type(e).__name__}: {_one_line(e)}); set `input_size` if the model expects another size"
        ) from e
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 1:
        got = f"a tensor of shape {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(f"model: {spec} must return the logits as one tensor [batch, classes]; it returned {got}")
    return int(y.shape[1])


def is_custom(spec: str) -> bool:
    """`my_pkg.module:build` or `path/to/file.py:build` (not a torchvision:/timm: spec)."""
    left, sep, fn = spec.rpartition(":")
    return bool(sep and left and fn) and left not in ("torchvision", "timm") and fn.isidentifier()


def _import_builder(spec: str):
    import importlib
    import importlib.util
    import sys

    left, _, fn = spec.rpartition(":")
    if left.endswith(".py"):
        p = Path(left)
        if not p.is_file():
            raise ModelError(f"model: the file {p} of '{spec}' does not exist")
        name = f"xai_user_model_{abs(hash(str(p.resolve())))}"
        folder = str(p.resolve().parent)
        sys.path.insert(0, folder)  # its sibling modules import while it loads
        try:
            mspec = importlib.util.spec_from_file_location(name, p)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            mspec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelError(f"model: importing {p} failed: {type(e).__name__}: {_one_line(e)}") from e
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        if not all(part.isidentifier() for part in left.split(".")):
            raise ModelError(
                f"model: '{spec}' is neither MODULE:FUNCTION (my_pkg.models:build) nor FILE.py:FUNCTION "
                "(see `xai models`)"
            )
        added = "" not in sys.path and "." not in sys.path
        if added:  # `xai` (a console script) imports from the current folder like `python -m` does
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(left)
        except ImportError as e:
            raise ModelError(
                f"model: cannot import '{left}' ({_one_line(e)}); is it installed, on PYTHONPATH or in the current folder?"
            ) from e
        except Exception as e:
            raise ModelError(f"model: importing '{left}' failed: {type(e).__name__}: {_one_line(e)}") from e
        finally:
            if added and "" in sys.path:
                sys.path.remove("")
    builder = getattr(module, fn, None)
    if not callable(builder):
        raise ModelError(f"model: '{left}' has no function '{fn}'")
    return builder


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _build_custom(spec: str, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    import inspect

    builder = _import_builder(spec)
    kwargs = {}
    if num_classes is not None:
        try:
            params = inspect.signature(builder).parameters
        except (TypeError, ValueError):
            params = {}
        takes = "num_classes" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if takes:
            kwargs["num_classes"] = num_classes
    try:
        model = builder(**kwargs)
    except Exception as e:
        raise ModelError(f"model: {spec}() failed: {type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"model: {spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if num_classes is not None and not kwargs:
        n = _num_outputs(model)
        if n != num_classes:
            raise ModelError(
                f"model: {spec}() built a model with {n} outputs but num_classes is {num_classes} "
                "(give the function a num_classes parameter, or fix num_classes)"
            )
    return model, Preprocess((224, 224), 256)


def _build_torchvision(name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as e:
        raise ModelError(f"model: torchvision has no model '{name}' (see torchvision.models.list_models())") from e
    weights_enum = torchvision.models.get_model_weights(builder)
    w = None
    if weights is None or weights.lower() == "default":
        w = weights_enum.DEFAULT
    elif weights.lower() != "none" and not _is_path(weights):
        try:
            w = weights_enum[weights]
        except KeyError as e:
            allowed = ", ".join(m.name for m in weights_enum)
            raise ModelError(f"model.weights: '{weights}' is not a weight of {name} (allowed: {allowed})") from e
    kwargs = {}
    if num_classes is not None and w is None:
        kwargs["num_classes"] = num_classes
    from .hub import offline_advice, offline_reason, stdout_to_stderr, torch_hub_cached

    if w is not None and getattr(w, "url", None) and not torch_hub_cached(w.url):
        reason = offline_reason("download.pytorch.org")  # fail in seconds, not after retries
        if reason:
            raise ModelError(f"model: torchvision:{name} ({w}): {offline_advice(reason)}")
    try:
        with stdout_to_stderr():  # torch.hub prints `Downloading: ...` on stdout (--json owns it)
            model = builder(weights=w, **kwargs)
    except Exception as e:  # download failures come as URLError, OSError, RuntimeError...
        raise ModelError(
            f"model: could not get weights {w} for torchvision:{name} ({type(e).__name__}: {e}); {OFFLINE_HINT}"
        ) from e
    preset = (w or weights_enum.DEFAULT).transforms()
    return model, Preprocess.from_torchvision(preset)


def _timm_create(full: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """Cache first (no network round-trips); the Hub only when the cache misses and we may go online."""
    import timm

    if not pretrained:
        return timm.create_model(full, pretrained=False, **kwargs)
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover - timm depends on it
        return timm.create_model(full, pretrained=True, **kwargs)
    from .hub import offline_advice, offline_reason, stdout_to_stderr

    was_offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        with stdout_to_stderr():
            return timm.create_model(full, pretrained=True, **kwargs)
    except Exception:
        pass
    finally:
        hf_constants.HF_HUB_OFFLINE = was_offline
    # not cached: without network huggingface_hub retries for about a minute; say so in seconds
    reason = "HF_HUB_OFFLINE is set" if was_offline else offline_reason("huggingface.co")
    if reason:
        raise ModelError(f"model: timm:{full}: {offline_advice(reason)}")
    with stdout_to_stderr():
        return timm.create_model(full, pretrained=True, **kwargs)


def _build_timm(name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ModelError(f"model: timm has no model '{arch}' (see timm.list_models())")
    pretrained = weights is None or (weights.lower() != "none" and not _is_path(weights))
    full = name
    if weights and pretrained and weights.lower() != "default":
        full = f"{arch}.{weights}"
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        model = _timm_create(full, pretrained, kwargs)
    except ModelError:
        raise
    except Exception as e:
        if not pretrained:
            raise ModelError(f"model: timm could not build {full}: {e}") from e
        raise ModelError(
            f"model: could not get pretrained weights for timm:{full} ({type(e).__name__}: {str(e)[:200]}); {OFFLINE_HINT}"
        ) from e
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, Preprocess.from_timm(cfg)


def load_model(
    spec: str = "default",
    weights: str | None = None,
    *,
    num_classes: int | None = None,
    class_names: str | Path | None = None,
    device: str | torch.device = "cpu",
    preprocess: dict | None = None,
) -> LoadedModel:
    """Build a classifier from a spec and return it in eval mode with its preprocessing
    (`preprocess`: overrides of input_size, resize, crop, mean, std, interpolation)."""
    spec = spec.strip()
    if spec == "default":
        if weights not in (None, "default"):
            raise ModelError(
                "model.weights: the default model has its own embedded weights; use timm:tf_efficientnet_lite0 for others"
            )
        import timm

        from .default import build_default

        model = build_default()
        pre = Preprocess.from_timm(timm.data.resolve_data_config({}, model=model))
    elif spec.startswith("torchvision:"):
        model, pre = _build_torchvision(spec.split(":", 1)[1], weights, num_classes)
    elif spec.startswith("timm:"):
        model, pre = _build_timm(spec.split(":", 1)[1], weights, num_classes)
    elif is_custom(spec):
        if weights is not None and weights.lower() not in ("none", "default") and not _is_path(weights):
            raise ModelError(f"model.weights: '{weights}' is not a file; your own model takes a local checkpoint")
        model, pre = _build_custom(spec, num_classes)
    else:
        raise ModelError(
            f"model: unknown spec '{spec}' (allowed: default, torchvision:NAME, timm:NAME, "
            "my_pkg.module:build, path/to/file.py:build; "
            "a local checkpoint goes in `weights:` together with its architecture)"
        )
    if _is_path(weights):
        _load_checkpoint_into(model, weights)
    model.eval()
    if preprocess:
        pre = pre.with_overrides(**preprocess)
    n = _outputs_of(model, pre, spec) if is_custom(spec) else _num_outputs(model)
    return LoadedModel(model.to(device), pre, _class_names(n, class_names), spec, weights)


def load_model_cfg(mcfg, device: str | torch.device = "cpu") -> LoadedModel:
    """load_model from a config's `model:` section (config.ModelCfg)."""
    return load_model(
        mcfg.name,
        mcfg.weights,
        num_classes=mcfg.num_classes,
        class_names=mcfg.class_names,
        device=device,
        preprocess=mcfg.preprocess_overrides() if hasattr(mcfg, "preprocess_overrides") else None,
    )


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{spec}' was asked for but CUDA is not available here (use auto or cpu)")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' was asked for but is not available here (use auto or cpu)")
    return torch.device(spec)
