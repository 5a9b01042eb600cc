"""Non-negative matrix factorisation in torch, and the concept factorisation file.

    A [N, C] >= 0  ~  U [N, K] @ W [K, C],   U, W >= 0

`nmf` fits both factors with Lee & Seung's multiplicative updates for the Frobenius loss (each
update never increases ||A - UW||_F; no sklearn needed, runs on the activations' device);
`nmf_transform` solves for U with W fixed (the same U-update: a non-negative least squares per
row), which is how new images get concept coefficients; `nmf_batched` factorises each item of a
batch on its own (Deep Feature Factorisation: one image's positions x channels).

The concept factorisation file (`concepts.safetensors`, written by `xai concepts extract`, read
by the `concept_maps` method) holds W and, as string metadata, the layer, the class and the fit
key that decides whether a resumed run may reuse it.

Layer 0: imports torch and safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigError

EPS = 1e-9
FACTORISATION = "concepts.safetensors"


def _init(n: int, k: int, c: int, scale: float, seed: int, device, batch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    u = torch.rand(*lead, n, k, generator=g).to(device) * scale + EPS
    w = torch.rand(*lead, k, c, generator=g).to(device) * scale + EPS
    return u, w


def nmf(a: Tensor, k: int, iters: int = 300, seed: int = 0, tol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(U [N, K], W [K, C]) with A ~ U W for a non-negative A [N, C] (float32 on A's device).

    Multiplicative updates, W then U, until the relative error changes by less than `tol` over
    10 iterations or `iters` is reached. Rows of W are scaled to unit norm (U takes the scale),
    so concept coefficients are comparable across concepts.
    """
    a = a.float().clamp(min=0)
    n, c = a.shape
    scale = float((a.mean() / max(k, 1)).sqrt()) if a.numel() else 1.0
    u, w = _init(n, k, c, scale, seed, a.device)
    norm_a = float(a.norm()) + EPS
    prev = None
    for it in range(iters):
        w = w * (u.T @ a) / (u.T @ u @ w + EPS)
        u = u * (a @ w.T) / (u @ (w @ w.T) + EPS)
        if it % 10 == 9:
            err = float((a - u @ w).norm()) / norm_a
            if prev is not None and abs(prev - err) < tol:
                break
            prev = err
    s = w.norm(dim=1).clamp(min=EPS)
    return u * s, w / s[:, None]


def nmf_transform(a: Tensor, w: Tensor, iters: int = 200) -> Tensor:
    """U [..., N, K] >= 0 minimising ||A - U W|| with W [K, C] fixed (A [..., N, C] >= 0)."""
    a = a.float().clamp(min=0)
    w = w.to(a.device, torch.float32)
    k = w.shape[0]
    aw = a @ w.T  # [..., N, K]
    ww = w @ w.T  # [K, K]
    # per row (one image position each), so a row's result never depends on the other rows
    u = torch.full((*a.shape[:-1], k), 1.0 / k, device=a.device) * (aw.clamp(min=0).mean(-1, keepdim=True) + EPS).sqrt()
    for _ in range(iters):
        u = u * aw / (u @ ww + EPS)
    return u


def nmf_batched(a: Tensor, k: int, iters: int = 150, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Each item on its own: A [B, N, C] -> U [B, N, K], W [B, K, C]; components ordered by their
    share of the item's reconstruction (largest first), so the result does not depend on the batch."""
    a = a.float().clamp(min=0)
    b, n, c = a.shape
    u, w = _init(n, k, c, 1.0, seed, a.device)
    scale = (a.mean(dim=(1, 2)) / max(k, 1)).sqrt()[:, None, None] + EPS
    u, w = u[None] * scale, w[None] * scale
    for _ in range(iters):
        ut = u.transpose(1, 2)
        w = w * (ut @ a) / (ut @ u @ w + EPS)
        u = u * (a @ w.transpose(1, 2)) / (u @ (w @ w.transpose(1, 2)) + EPS)
    s = w.norm(dim=2).clamp(min=EPS)  # [B, K]
    u, w = u * s[:, None, :], w / s[:, :, None]
    order = u.sum(dim=1).argsort(dim=1, descending=True)  # [B, K]
    u = u.gather(2, order[:, None, :].expand(b, n, k))
    w = w.gather(1, order[:, :, None].expand(b, k, c))
    return u, w


def relative_error(a: Tensor, u: Tensor, w: Tensor) -> float:
    a = a.float().clamp(min=0)
    return float((a - u @ w).norm() / (a.norm() + EPS))


# --------------------------------------------------------------------------------------------
# the factorisation file
# --------------------------------------------------------------------------------------------
def save_factorisation(path: Path, w: Tensor, meta: dict) -> None:
    """W [K, C] and `meta` (JSON-able values) to a .safetensors file, atomically."""
    import os
    import tempfile

    from safetensors.torch import save

    data = save({"W": w.detach().float().cpu().contiguous()}, metadata={"meta": json.dumps(meta, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".xai-tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def factorisation_file(path: str | Path) -> Path:
    """The factorisation file named by `path` (decided by the name alone, so a config's hash and
    rebasing do not depend on what exists yet): a .safetensors file itself, else FOLDER/concepts.safetensors."""
    p = Path(path)
    return p if p.name.endswith(".safetensors") else p / FACTORISATION


def load_factorisation(path: str | Path) -> tuple[Tensor, dict]:
    """(W [K, C], meta); a missing or damaged file is a ConfigError naming it and the fix."""
    p = factorisation_file(path)
    if not p.is_file():
        raise ConfigError(
            f"concepts: no factorisation at {p}; run `xai concepts extract --config ...` first "
            "(it writes OUT/concepts/concepts.safetensors)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            w = f.get_tensor("W")
    except Exception as e:
        raise ConfigError(f"concepts: {p} is not a concept factorisation ({type(e).__name__}: {e})") from None
    if w.dim() != 2 or not isinstance(meta, dict) or "layer" not in meta:
        raise ConfigError(f"concepts: {p} is not a concept factorisation (no W [K, C] with its layer)")
    return w, meta
