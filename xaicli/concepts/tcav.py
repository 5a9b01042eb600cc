"""TCAV (Kim et al., ICML 2018) with the paper's significance test.

For each concept c, layer l and random set R_i (i = 1..N):
    CAV v = unit normal of a logistic regression separating f_l(c's images) (label 1) from
            f_l(R_i) (label 0), trained full-batch with L-BFGS on the device; its accuracy on a
            stratified held-out split is recorded
    S_k(x) = grad_{f_l} logit_k(x) . v          (conceptual sensitivity; objectives.logit)
    TCAV score = |{x in class-k images : S_k(x) > 0}| / |class-k images|
The null distribution: CAVs of random set R_{i-1} against R_i (random-vs-random; a single fixed
reference set R_0 would make the N null CAVs share R_0's quirks and their scores agree). The
N concept scores and the N random scores go to a two-sided t-test (scipy.stats.ttest_ind);
the p-value is Bonferroni-corrected over every (concept, layer, class) tested, and a concept
with corrected p >= alpha is marked `significant = false` (still written, never hidden).

Activations are flattened (C*h*w), as Kim et al. and Captum do. Gradients of the class images
are streamed: per batch only their dot products with every CAV of the layer are kept.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from ..outputs import atomic_write_bytes, save_figure, write_csv
from .acts import Loader, check_layers, concept_session, flat_activations, layer_gradients, resolve_class, set_items
from .config import ConceptsConfig

TCAV_FIELDS = [
    "concept",
    "layer",
    "class",
    "class_label",
    "score_mean",
    "score_std",
    "random_mean",
    "random_std",
    "p_value",
    "p_bonferroni",
    "significant",
    "cav_accuracy",
    "cav_accuracy_std",
    "random_sets",
    "images",
]
RUN_FIELDS = ["concept", "layer", "class", "random_set", "score", "cav_accuracy"]
RANDOM = "random"  # the random-vs-random rows of tcav_runs.csv and keys of cavs.safetensors


# --------------------------------------------------------------------------------------------
# the pieces (pure functions on tensors; tests use them directly)
# --------------------------------------------------------------------------------------------
def _split(n: int, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=g)
    k = min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0
    return perm[k:], perm[:k]


@dataclass
class Cav:
    vector: Tensor  # [D], unit norm, pointing to the concept (label 1)
    bias: float
    accuracy: float  # on the held-out split (NaN if a set has a single image)


def train_cav(
    pos: Tensor, neg: Tensor, test_fraction: float = 0.33, l2: float = 0.01, steps: int = 100, seed: int = 0
) -> Cav:
    """Logistic regression (mean BCE + l2/2 ||w||^2, L-BFGS) of pos (1) vs neg (0) [n, D]."""
    g = torch.Generator().manual_seed(seed)
    (tr1, te1), (tr0, te0) = _split(len(pos), test_fraction, g), _split(len(neg), test_fraction, g)
    dev = pos.device
    x = torch.cat([pos[tr1.to(dev)], neg[tr0.to(dev)]]).float()
    y = torch.cat([torch.ones(len(tr1)), torch.zeros(len(tr0))]).to(dev)
    w = torch.zeros(x.shape[1], device=dev, requires_grad=True)
    b = torch.zeros((), device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), float(b.detach())
    xt = torch.cat([pos[te1.to(dev)], neg[te0.to(dev)]]).float()
    yt = torch.cat([torch.ones(len(te1)), torch.zeros(len(te0))]).to(dev)
    acc = float(((xt @ w + b > 0).float() == yt).float().mean()) if len(yt) else math.nan
    norm = float(w.norm())
    return Cav(w / norm if norm > 0 else w, b / norm if norm > 0 else b, acc)


def positive_share(grads: Tensor, cavs: Tensor) -> Tensor:
    """TCAV sign-count scores [M]: share of the rows of grads [n, D] with grad . cav_m > 0."""
    return ((grads.float() @ cavs.float().T) > 0).float().mean(dim=0)


def t_test(concept: list[float], random: list[float]) -> float:
    """Two-sided p-value of Student's t-test of the concept's scores against random-vs-random's;
    1.0 when both are constant and equal (no evidence either way)."""
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # constant samples (all 1.0): scipy warns, the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(concept, random).pvalue)
    return 1.0 if math.isnan(p) else p


def bonferroni(p: float, tests: int) -> float:
    return min(1.0, p * tests)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
@dataclass
class TcavSummary:
    out: Path
    rows: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    failed: int = 0
    seconds: float = 0.0


def _random_sets(t, loader: Loader, layers, acts_of, seed: int) -> list[dict[str, Tensor]]:
    """[R_0, R_1, ..., R_N]: {layer: [n, D]} per set (concepts use R_1..R_N; random-vs-random R_{i-1} vs R_i)."""
    r = t.random
    if r.folders is not None:
        return [acts_of(f"random_{i}", set_items(f"random.folders[{i}]", f)) for i, f in enumerate(r.folders)]
    pool = acts_of(RANDOM, set_items("random.folder", r.folder))
    n = next(iter(pool.values())).shape[0]
    if n < r.size:
        raise ConfigError(
            f"random.folder: {n} readable image(s), fewer than random.size = {r.size}; add images or lower `size`"
        )
    g = torch.Generator().manual_seed(seed + 1)
    sets = []
    for _ in range(r.sets + 1):
        idx = torch.randperm(n, generator=g)[: r.size]
        sets.append({layer: a[idx] for layer, a in pool.items()})
    return sets


def run_tcav(cfg: ConceptsConfig, progress=None, wait: bool = False, lm=None) -> TcavSummary:
    """`xai concepts tcav`: OUT/concepts/tcav.csv, tcav_runs.csv, cavs.safetensors, tcav.png.
    `progress(what)` makes a progress reporter; `lm` (a LoadedModel) replaces cfg.model."""
    t0 = time.perf_counter()
    t = cfg.tcav
    out = cfg.concepts_dir
    with concept_session(cfg, wait, lm) as (device, lm, adapter):
        model = lm.model
        layers = check_layers(adapter, t.layers)
        classes = [(resolve_class(lm, k), set_items(f"classes.{k}", f)) for k, f in t.classes.items()]
        concept_items = {c: set_items(f"concepts.{c}", f) for c, f in t.concepts.items()}
        for c, items in concept_items.items():
            _check_count(f"concept '{c}'", len(items), t.min_images, t.concepts[c])
        loader = Loader(lm, device, cfg.batch_size, cfg.workers, cfg.max_pixels, out)
        reset_errors(out, "tcav:")
        bar = progress("activations") if progress else None

        def acts_of(name: str, items) -> dict[str, Tensor]:
            parts: dict[str, list[Tensor]] = {layer: [] for layer in layers}
            for _, x in loader.batches(f"tcav:{name}", items, bar):
                for layer, a in flat_activations(model, x, layers).items():
                    parts[layer].append(a)
            if not parts[layers[0]]:
                raise ConfigError(f"{name}: none of its {len(items)} image(s) could be read (see {out / 'errors.csv'})")
            return {layer: torch.cat(p) for layer, p in parts.items()}

        n_todo = sum(len(i) for i in concept_items.values()) + sum(len(i) for _, i in classes)
        if bar:
            bar.start(n_todo)
        try:
            concept_acts = {}
            for c, items in concept_items.items():
                concept_acts[c] = acts_of(c, items)
                n = concept_acts[c][layers[0]].shape[0]
                _check_count(f"concept '{c}'", n, t.min_images, t.concepts[c], readable=True)
            randoms = _random_sets(t, loader, layers, acts_of, t.seed)
        finally:
            if bar:
                bar.stop()
        cavs, accs = _train_all(t, layers, concept_acts, randoms, device, progress)
        signs = _directional(model, loader, layers, classes, cavs, device, progress)
        rows, runs = _score(t, lm, layers, classes, list(concept_acts), cavs, accs, signs, len(randoms) - 1)
        files = _write(out, rows, runs, cavs, accs, t)
        return TcavSummary(out, rows, files, loader.failed, time.perf_counter() - t0)


def _check_count(what: str, n: int, need: int, folder: str, readable: bool = False) -> None:
    if n < need:
        kind = "readable image(s)" if readable else "image(s)"
        raise ConfigError(
            f"{what}: {n} {kind} in {folder}; TCAV needs at least {need} (min_images) for a CAV worth testing"
        )


def reset_errors(out: Path, prefix: str) -> None:
    """Drop the previous run's rows of this command from OUT/concepts/errors.csv."""
    from ..outputs import ERROR_FIELDS, read_csv

    p = out / "errors.csv"
    if p.is_file():
        write_csv(p, ERROR_FIELDS, [r for r in read_csv(p) if not r.get("image", "").startswith(prefix)])


def _train_all(t, layers, concept_acts, randoms, device, progress):
    """{(name, layer): [N, D] CAVs} and {(name, layer): [N] accuracies}; name = concept | 'random'."""
    names = [*concept_acts, RANDOM]
    bar = progress("CAVs") if progress else None
    if bar:
        bar.start(len(names) * len(layers) * (len(randoms) - 1))
    cavs, accs = {}, {}
    try:
        for layer in layers:
            for name in names:
                vs, acc = [], []
                for i in range(1, len(randoms)):
                    # random-vs-random: R_{i-1} against R_i, so that both sides change from run to run
                    pos = (randoms[i - 1] if name == RANDOM else concept_acts[name])[layer].to(device)
                    cav = train_cav(pos, randoms[i][layer].to(device), t.test_fraction, t.l2, t.steps, t.seed + i)
                    vs.append(cav.vector)
                    acc.append(cav.accuracy)
                    if bar:
                        bar.advance(1)
                cavs[(name, layer)] = torch.stack(vs)
                accs[(name, layer)] = acc
    finally:
        if bar:
            bar.stop()
    return cavs, accs


def _directional(model, loader, layers, classes, cavs, device, progress):
    """{(class, layer): [M] positive counts, n} over every CAV of the layer (concepts x N, random x N)."""
    bar = progress("directional derivatives") if progress else None
    if bar:
        bar.start(sum(len(items) for _, items in classes))
    result = {}
    try:
        for k, items in classes:
            mats = {layer: torch.cat([v for (name, lay), v in cavs.items() if lay == layer]) for layer in layers}
            counts = {layer: torch.zeros(mats[layer].shape[0], device=device) for layer in layers}
            n = 0
            for _, x in loader.batches(f"tcav:class_{k}", items, bar):
                n += x.shape[0]
                for layer in layers:
                    _, grad, _ = layer_gradients(model, x, layer, k)
                    counts[layer] += ((grad.float().flatten(1) @ mats[layer].T) > 0).float().sum(dim=0)
            if n == 0:
                raise ConfigError(f"classes: none of the images for class {k} could be read")
            for layer in layers:
                result[(k, layer)] = (counts[layer].cpu() / n, n)
    finally:
        if bar:
            bar.stop()
    return result


def _score(t, lm, layers, classes, concepts, cavs, accs, signs, n_random):
    tests = len(concepts) * len(layers) * len(classes)
    rows, runs = [], []
    for k, _ in classes:
        for layer in layers:
            shares, n = signs[(k, layer)]
            order = [name for (name, lay) in cavs if lay == layer]
            by = {name: shares[i * n_random : (i + 1) * n_random].tolist() for i, name in enumerate(order)}
            rnd = by[RANDOM]
            for name in [*concepts, RANDOM]:
                for i, s in enumerate(by[name]):
                    runs.append(
                        {
                            "concept": name,
                            "layer": layer,
                            "class": k,
                            "random_set": i + 1,
                            "score": f"{s:.6g}",
                            "cav_accuracy": f"{accs[(name, layer)][i]:.6g}",
                        }  # fmt: skip
                    )
            for c in concepts:
                sc, acc = torch.tensor(by[c]), torch.tensor(accs[(c, layer)])
                p = t_test(by[c], rnd)
                pb = bonferroni(p, tests)
                rows.append(
                    {
                        "concept": c,
                        "layer": layer,
                        "class": k,
                        "class_label": lm.label(k),
                        "score_mean": f"{float(sc.mean()):.6g}",
                        "score_std": f"{float(sc.std(unbiased=False)):.6g}",
                        "random_mean": f"{float(torch.tensor(rnd).mean()):.6g}",
                        "random_std": f"{float(torch.tensor(rnd).std(unbiased=False)):.6g}",
                        "p_value": f"{p:.6g}",
                        "p_bonferroni": f"{pb:.6g}",
                        "significant": "true" if pb < t.alpha else "false",
                        "cav_accuracy": f"{float(acc.nanmean()):.6g}",
                        "cav_accuracy_std": f"{float(acc[~acc.isnan()].std(unbiased=False)) if (~acc.isnan()).any() else math.nan:.6g}",
                        "random_sets": n_random,
                        "images": n,
                    }
                )
    return rows, runs


def _write(out: Path, rows, runs, cavs, accs, t) -> dict[str, Path]:
    from safetensors.torch import save

    write_csv(out / "tcav_runs.csv", RUN_FIELDS, runs)
    tensors = {
        f"{name}|{layer}|{i + 1}": v[i].detach().float().cpu().contiguous()
        for (name, layer), v in cavs.items()
        for i in range(v.shape[0])
    }
    meta = {
        "format": "xaicli TCAV CAVs: key 'concept|layer|random_set' -> unit CAV over the flattened layer output",
        "accuracies": json.dumps({f"{n}|{lay}": a for (n, lay), a in accs.items()}),
    }
    atomic_write_bytes(out / "cavs.safetensors", save(tensors, metadata=meta))
    png = plot_tcav(out / "tcav.png", rows, t.alpha)
    write_csv(out / "tcav.csv", TCAV_FIELDS, rows)  # last: its presence means the run finished
    return {
        "tcav.csv": out / "tcav.csv",
        "tcav_runs.csv": out / "tcav_runs.csv",
        "cavs": out / "cavs.safetensors",
        "chart": png,
    }


def plot_tcav(path: Path, rows: list[dict], alpha: float) -> Path:
    """Bar chart: one panel per class, bars per (layer, concept) with std error bars, the
    random-vs-random mean as a grey bar, '*' over significant concepts, 'n.s.' (hatched) else."""

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys((r["class"], r["class_label"]) for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    fig, axes = plt.subplots(
        1, len(classes), figsize=(max(5.0, 1.2 * len(layers) * (len(concepts) + 1)) * len(classes), 4.2), dpi=100,
        squeeze=False,
    )  # fmt: skip
    width = 0.8 / (len(concepts) + 1)
    colors = plt.get_cmap("tab10")
    for ax, (k, label) in zip(axes[0], classes, strict=True):
        by = {(r["layer"], r["concept"]): r for r in rows if r["class"] == k}
        for j, c in enumerate(concepts):
            for li, layer in enumerate(layers):
                r = by.get((layer, c))
                if r is None:
                    continue
                sig = r["significant"] == "true"
                x = li + (j - len(concepts) / 2) * width
                ax.bar(
                    x, float(r["score_mean"]), width, yerr=float(r["score_std"]), capsize=3,
                    color=colors(j), alpha=1.0 if sig else 0.35, hatch=None if sig else "//",
                    label=c if li == 0 else None,
                )  # fmt: skip
                ax.text(x, min(1.04, float(r["score_mean"]) + float(r["score_std"]) + 0.03),
                        "*" if sig else "n.s.", ha="center", fontsize=9)  # fmt: skip
        for li, layer in enumerate(layers):  # random-vs-random: the same for every concept
            r = next((by[(layer, c)] for c in concepts if (layer, c) in by), None)
            if r is not None:
                ax.bar(li + (len(concepts) / 2) * width, float(r["random_mean"]), width, yerr=float(r["random_std"]),
                       capsize=3, color="0.6", label="random" if li == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.axhline(0.5, color="0.3", linewidth=0.8, linestyle=":")
        ax.set_ylabel("TCAV score")
        ax.set_title(f"class {k} ({label})\n* significant (Bonferroni p < {alpha:g}), n.s. not", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    return save_figure(fig, path)
