"""Sanity check (Adebayo 2018): cascading parameter randomization.

On a deep copy of the model (the user's model is never touched), parameter groups are
re-initialised one after another from the logits downward (execution order, reversed), and the
method's map is recomputed after each step for the same target. Each randomized map is compared
with the original by Spearman rank correlation:
    abs      |map| clipped at its 99th percentile and scaled to [0, 1]
    signed   map divided by the 99th percentile of |map|
A method that passes loses correlation as more of the model is randomized. Ties get average
ranks; a constant map has no rank information, so its correlation is defined as 0.
Writes OUT/sanity.csv (image, method, step, layer, spearman_abs, spearman_signed) and one plot
per method (OUT/sanity_<method>.png); metrics.csv gets the fully randomized correlations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from ..hooks import execution_order
from ..methods.base import eval_mode
from ..outputs import write_csv
from .base import Metric, MetricResult, register


def average_ranks(v: Tensor) -> Tensor:
    """Row-wise ranks [B, N] (1-based) with ties given their average rank, like scipy's rankdata."""
    b, n = v.shape
    sv, order = torch.sort(v, dim=1, stable=True)
    new_group = torch.ones_like(sv, dtype=torch.bool)
    new_group[:, 1:] = sv[:, 1:] != sv[:, :-1]
    gid = torch.cumsum(new_group.long(), dim=1) - 1 + torch.arange(b, device=v.device)[:, None] * n
    pos = torch.arange(n, device=v.device, dtype=torch.float64).expand(b, n).reshape(-1)
    flat = gid.reshape(-1)
    first = torch.full((b * n,), float("inf"), dtype=torch.float64, device=v.device).scatter_reduce(
        0, flat, pos, "amin"
    )
    last = torch.full((b * n,), -1.0, dtype=torch.float64, device=v.device).scatter_reduce(0, flat, pos, "amax")
    avg_sorted = ((first[flat] + last[flat]) / 2 + 1).view(b, n)
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, order, avg_sorted)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair [B, N] x [B, N] -> [B]; 0 if a row is constant."""
    ra, rb = average_ranks(a.double()), average_ranks(b.double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


def _q99(a: Tensor) -> Tensor:
    k = max(1, int(round(0.99 * a.shape[1])))
    return a.kthvalue(k, dim=1).values


def prep_abs(m: Tensor) -> Tensor:
    a = m.flatten(1).abs().float()
    q = _q99(a).clamp_min(1e-12)[:, None]
    return torch.minimum(a, q) / q


def prep_signed(m: Tensor) -> Tensor:
    a = m.flatten(1).float()
    return a / _q99(a.abs()).clamp_min(1e-12)[:, None]


def layer_groups(model: nn.Module, x: Tensor, depth: int) -> list[tuple[str, list[str]]]:
    """(group name, module names) from the logits down: parametric modules in execution order,
    grouped by the first `depth` parts of their name, reversed."""
    groups: dict[str, list[str]] = {}
    for name in execution_order(model, x[:1]):
        key = ".".join(name.split(".")[:depth]) or "(model)"
        groups.setdefault(key, []).append(name)
    return list(reversed(list(groups.items())))


def randomize_(modules: list[nn.Module], seed: int) -> None:
    """Re-initialise in place: `reset_parameters()` where a module has it, else N(0, 0.01)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in modules:
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
            else:
                for p in mod.parameters(recurse=False):
                    with torch.no_grad():
                        p.normal_(0.0, 0.01)


@register(
    "sanity",
    "Cascading randomization (Adebayo 2018): Spearman rank correlation of the map with the maps of "
    "progressively randomized models; writes sanity.csv + a plot per method. Lower is better",
)
@dataclass
class CascadingRandomization(Metric):
    depth: Annotated[int, Field(ge=1)] = 2  # parameter groups: modules sharing the first `depth` name parts
    seed: int = 0

    needs: ClassVar[frozenset[str]] = frozenset({"method"})
    direction: ClassVar[str] = "lower"
    outputs: ClassVar[dict[str, str]] = {"sanity-signed": "lower"}
    value_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    def compute(self, ctx, x, maps, target, *, method, **extras) -> MetricResult:
        """`method` is the BoundMethod that made `maps`; it is rebound to the randomized copy at
        every step (a bound method may hold model-specific state: a head, a canonized copy). The
        model randomised is the one as loaded (with its BatchNorms), not the run's folded copy."""
        model = ctx.unprepared if ctx.unprepared is not None else ctx.model
        groups = layer_groups(model, x, self.depth)
        rnd = copy.deepcopy(model)
        named = dict(rnd.named_modules())
        orig_abs, orig_signed = prep_abs(maps), prep_signed(maps)
        rho_abs, rho_signed = [], []
        steps = [("(none)", [])] + groups  # step 0: the copy before any randomization (correlation 1)
        with eval_mode(rnd):
            for i, (_, names) in enumerate(steps):
                randomize_([named[n] for n in names], self.seed + i)
                m = method.rebind(rnd)(x, target).maps.detach()
                m = torch.nan_to_num(m.float(), nan=0.0, posinf=0.0, neginf=0.0)
                rho_abs.append(spearman(orig_abs, prep_abs(m)))
                rho_signed.append(spearman(orig_signed, prep_signed(m)))
        del rnd
        ra, rs = torch.stack(rho_abs, 1).cpu(), torch.stack(rho_signed, 1).cpu()
        table = [
            {
                "index": j,
                "step": i,
                "layer": steps[i][0],
                "spearman_abs": f"{float(ra[j, i]):.6f}",
                "spearman_signed": f"{float(rs[j, i]):.6f}",
            }
            for j in range(ra.shape[0])
            for i in range(ra.shape[1])
        ]
        return MetricResult({self.name: ra[:, -1], f"{self.name}-signed": rs[:, -1]}, table=table)


SANITY_FIELDS = ["image", "method", "step", "layer", "spearman_abs", "spearman_signed"]


def write_sanity(out: Path, rows: list[dict]) -> list[Path]:
    """OUT/sanity.csv and one plot per method: mean correlation against the layers randomized."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..outputs import save_figure

    write_csv(out / "sanity.csv", SANITY_FIELDS, rows)
    plots = []
    for method in dict.fromkeys(r["method"] for r in rows):
        per: dict[int, list] = {}
        for r in rows:
            if r["method"] == method:
                per.setdefault(int(r["step"]), [r["layer"], [], []])
                per[int(r["step"])][1].append(float(r["spearman_abs"]))
                per[int(r["step"])][2].append(float(r["spearman_signed"]))
        steps = sorted(per)
        labels = [per[s][0] for s in steps]
        mean_abs = [sum(per[s][1]) / len(per[s][1]) for s in steps]
        mean_signed = [sum(per[s][2]) / len(per[s][2]) for s in steps]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(steps) + 3), 4.5), dpi=100)
        ax.plot(steps, mean_abs, marker="o", label="Spearman, absolute values")
        ax.plot(steps, mean_signed, marker="s", label="Spearman, signed")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(steps)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("randomized down to (cumulative, from the logits; step 0: none)")
        ax.set_ylabel("rank correlation with the original map")
        ax.set_ylim(-1.05, 1.05)
        n = len(per[steps[0]][1])
        ax.set_title(f"sanity check (cascading randomization): {method}, {n} image(s)")
        ax.legend()
        ax.grid(True, alpha=0.3)
        plots.append(save_figure(fig, out / f"sanity_{method}.png"))
    return plots
