"""ConceptsConfig: the YAML of `xai concepts tcav|extract`, validated like RunConfig (strict keys,
bounded numbers, one-line errors naming the key). Paths are relative to the config file's folder.

    model: default                 # as in `xai explain` configs (name, weights, num_classes, ...)
    output: xai-out                # concept results go to OUT/concepts/, concept maps to OUT/concept_maps/
    tcav:
      concepts: {striped: concept_data/striped}     # name -> folder (>= min_images readable images)
      random: {folder: concept_data/random, sets: 10, size: 10}   # or {folders: [r0, r1, ...]}
      layers: [blocks.5]
      classes: {tabby: concept_data/cats}           # class (name or index) -> images to test
    extract:
      class: tabby
      images: concept_data/cats
      layer: bn2
      concepts: 5
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..config import DEFAULT_OUT, ModelCfg, _Strict, check_device, format_validation_error, read_yaml
from ..errors import ConfigError


class RandomCfg(_Strict):
    folder: str | None = Field(None, description="images sampled into `sets` random sets of `size` images")
    folders: list[str] | None = Field(
        None, min_length=3, description="explicit random sets: the first is the reference of random-vs-random"
    )
    sets: int = Field(10, ge=2, le=500, strict=True, description="random sets (Kim et al.: >= 10; paper: 500)")
    size: int = Field(10, ge=2, le=10_000, strict=True, description="images per sampled random set")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.folder is None) == (self.folders is None):
            raise ValueError("give either `folder:` (sampled into sets) or `folders:` (one per set)")
        return self


class TcavCfg(_Strict):
    concepts: dict[str, str] = Field(min_length=1, description="concept name -> folder of its images")
    random: RandomCfg
    layers: list[str] = Field(min_length=1, max_length=32)
    classes: dict[str, str] = Field(min_length=1, description="class (name or index) -> folder of images to test")
    test_fraction: float = Field(0.33, ge=0.05, le=0.8, allow_inf_nan=False, description="held-out share for accuracy")
    l2: float = Field(0.01, ge=0.0, le=100.0, allow_inf_nan=False, description="L2 weight of the logistic regression")
    steps: int = Field(100, ge=1, le=10_000, strict=True, description="L-BFGS iterations per CAV")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, allow_inf_nan=False, description="significance level (Bonferroni)")
    min_images: int = Field(10, ge=2, le=100_000, strict=True, description="fewest readable images per concept")
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("classes", "concepts", mode="before")
    @classmethod
    def _keys(cls, v):
        return {str(k): val for k, val in v.items()} if isinstance(v, dict) else v

    @field_validator("concepts")
    @classmethod
    def _names(cls, v):
        for k in v:
            if not k.strip() or "/" in k or "|" in k or k.startswith("random"):
                raise ValueError(f"concept name '{k}': a plain name, not starting with 'random', without / or |")
        return v


class ExtractCfg(_Strict):
    class_: str = Field(alias="class", description="the class (name or index) whose concepts are extracted")
    images: str = Field(description="folder of that class's images")
    layer: str | None = Field(None, description="layer (default: the model's CAM layer, e.g. bn2)")
    concepts: int = Field(5, ge=2, le=64, strict=True, description="K, the number of concepts (NMF rank)")
    scales: list[float] = Field(
        default_factory=lambda: [0.5, 0.25], min_length=1, max_length=6, description="crop side / image side"
    )
    iters: int = Field(500, ge=10, le=100_000, strict=True, description="NMF multiplicative-update iterations")
    importance: Literal["gradient", "sobol"] = Field(
        "gradient", description="gradient x coefficient (1 backward per image) | sobol: CRAFT's total indices"
    )
    sobol_designs: int = Field(32, ge=4, le=4096, strict=True, description="Sobol base points N: N (K+2) forwards")
    atlas_crops: int = Field(6, ge=1, le=32, strict=True, description="crops per concept in the atlas")
    min_images: int = Field(2, ge=1, le=100_000, strict=True)
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True)

    model_config = {**_Strict.model_config, "populate_by_name": True}

    @field_validator("class_", mode="before")
    @classmethod
    def _cls(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v):
        if any(not 0.05 <= s <= 1.0 for s in v):
            raise ValueError("each scale is a crop side as a fraction of the image side, in [0.05, 1]")
        return v


class ConceptsConfig(_Strict):
    model: ModelCfg = Field(default_factory=ModelCfg)
    output: str = Field(DEFAULT_OUT, min_length=1)
    device: str = "auto"
    batch_size: int = Field(16, gt=0, le=4096, strict=True)
    workers: int = Field(0, ge=0, le=64, strict=True)
    max_pixels: int = Field(178_956_970, gt=0, le=2**40, strict=True)
    tcav: TcavCfg | None = None
    extract: ExtractCfg | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        return check_device(v)

    @property
    def concepts_dir(self) -> Path:
        return Path(self.output) / "concepts"


def _rebase(data: dict, base: Path) -> dict:
    def fix(v):
        return v if not isinstance(v, str) or not v.strip() or Path(v).is_absolute() else str(base / v)

    d = dict(data)
    if isinstance(d.get("output"), str):
        d["output"] = fix(d["output"])
    if isinstance(d.get("model"), dict):
        m = dict(d["model"])
        if isinstance(m.get("class_names"), str):
            m["class_names"] = fix(m["class_names"])
        w = m.get("weights")
        if isinstance(w, str) and ("/" in w or w.endswith((".pt", ".pth", ".safetensors", ".bin"))):
            m["weights"] = fix(w)
        d["model"] = m
    t = d.get("tcav")
    if isinstance(t, dict):
        t = dict(t)
        for k in ("concepts", "classes"):
            if isinstance(t.get(k), dict):
                t[k] = {name: fix(p) for name, p in t[k].items()}
        if isinstance(t.get("random"), dict):
            r = dict(t["random"])
            r["folder"] = fix(r.get("folder")) if r.get("folder") is not None else None
            if isinstance(r.get("folders"), list):
                r["folders"] = [fix(p) for p in r["folders"]]
            t["random"] = {k: v for k, v in r.items() if v is not None or k != "folder"}
        d["tcav"] = t
    e = d.get("extract")
    if isinstance(e, dict) and isinstance(e.get("images"), str):
        d["extract"] = {**e, "images": fix(e["images"])}
    return d


def build_concepts_config(path: str | Path, overrides: dict | None = None, need: str | None = None) -> ConceptsConfig:
    """Read and validate a concepts config; `need` ('tcav' | 'extract') must have its section."""
    data = _rebase(read_yaml(path), Path(path).resolve().parent)
    for key, val in (overrides or {}).items():
        if val is not None:
            data[key] = val
    try:
        cfg = ConceptsConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), ConceptsConfig)) from None
    if need and getattr(cfg, need) is None:
        raise ConfigError(f"{path}: no `{need}:` section (see docs/concepts.md and configs/concepts.yaml)")
    return cfg
