"""Benchmark: images/s of each xaicli method vs plain inference and vs saliency (one forward +
one backward, the "F+B" unit: LRP's modified backward is compared with it), and vs peers.

    python bench/bench_methods.py                       # CPU or CUDA (auto), default model, batch 16
    python bench/bench_methods.py --device cuda --batch 64 --methods gradcam,saliency --peers
    python bench/bench_methods.py --e2e 48              # also `xai explain` end to end on 48 images

Prints a markdown table (and writes it with --out FILE). Each figure is the median of --repeat
timed runs after --warmup runs, with CUDA synchronised. Peers (pytorch-grad-cam, Captum, TorchCAM)
are timed only if installed (`pip install -e .[peers]`), on the same model, batch and target.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xaicli.data import load_image  # noqa: E402
from xaicli.methods import METHODS, build_method, make_context  # noqa: E402
from xaicli.methods.base import eval_mode  # noqa: E402
from xaicli.models import load_model  # noqa: E402

# parameters that keep the costly methods comparable to what peers run by default
BENCH_PARAMS = {
    "integrated_gradients": {"n_steps": 32, "internal_batch": 128},  # Captum: internal_batch_size 128
    "smoothgrad": {"n_samples": 16},
    # perturbation/Shapley methods: paper defaults cost thousands of forwards per image; these
    # settings keep a CPU benchmark short (the rows name them; docs/methods.md gives the costs)
    "occlusion": {"window": 32, "stride": 16},  # 13 x 13 = 169 positions
    "rise": {"n_masks": 500},
    "kernelshap": {"n_samples": 500},
    "gradientshap": {"n_samples": 16},
    "meaningful_perturbation": {"iterations": 50},
    "extremal_perturbation": {"iterations": 50},  # x 3 areas: 150 F + 150 B per image
}
# the LRP family is timed next to saliency (F + B) by default
LRP_METHODS = ("saliency", "lrp", "clrp", "sglrp", "relevance_cam")


def timeit(fn, device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_batch(lm, n: int, device) -> torch.Tensor:
    files = sorted(p for p in (ROOT / "sample_images").iterdir() if p.suffix in (".png", ".jpg"))
    xs = [lm.preprocess(load_image(f)) for f in files]
    return torch.stack([xs[i % len(xs)] for i in range(n)]).to(device)


def peer_fns(lm, x, target, layer_name):
    """name -> callable for the peers that are installed (same model, batch, target)."""
    fns = {}
    model = lm.model
    layer = dict(model.named_modules())[layer_name]
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        tg = [ClassifierOutputTarget(int(t)) for t in target]
        cam = GradCAM(model=model, target_layers=[layer])
        fns["gradcam / pytorch-grad-cam"] = lambda: cam(input_tensor=x, targets=tg)
        campp = GradCAMPlusPlus(model=model, target_layers=[layer])
        fns["gradcampp / pytorch-grad-cam"] = lambda: campp(input_tensor=x, targets=tg)
    except ImportError:
        pass
    try:
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

        sal = Saliency(model)
        fns["saliency / captum"] = lambda: sal.attribute(x, target=target).abs().amax(1)
        lgc = LayerGradCam(model, layer)

        def captum_gradcam():
            a = lgc.attribute(x, target=target, relu_attributions=True)
            return LayerAttribution.interpolate(a, x.shape[-2:], interpolate_mode="bilinear")

        fns["gradcam / captum"] = captum_gradcam
        ig = IntegratedGradients(model)
        fns["integrated_gradients / captum"] = lambda: ig.attribute(
            x, target=target, n_steps=32, internal_batch_size=x.shape[0] * 8
        )
    except ImportError:
        pass
    try:
        from torchcam.methods import GradCAM as TCGradCAM

        def torchcam_gradcam():
            with TCGradCAM(model, target_layer=layer_name) as extractor:
                scores = model(x)
                return extractor(target.tolist(), scores)

        fns["gradcam / torchcam"] = torchcam_gradcam
    except ImportError:
        pass
    try:
        from zennit.composites import EpsilonGammaBox

        from xaicli.methods.lrp import box_bounds

        low, high = box_bounds(x, lm.preprocess.mean, lm.preprocess.std)
        canon = lm_canonizers(lm)
        comp = EpsilonGammaBox(low=low, high=high, canonizers=canon)

        def zennit_lrp():
            xx = x.detach().clone().requires_grad_(True)
            with torch.enable_grad(), comp.context(model) as m:
                out = m(xx)
                init = torch.zeros_like(out).scatter_(1, target[:, None], 1.0) * out.detach()
                (g,) = torch.autograd.grad(out, xx, init)
            return g.sum(1)

        fns["lrp / zennit (canonizers applied and reverted per call)"] = zennit_lrp
    except ImportError:
        pass
    return fns


def lm_canonizers(lm):
    from xaicli.models.adapter import ModelAdapter

    return ModelAdapter(lm.model).canonizers()


def e2e(n: int, batch: int, device: str, methods: str) -> tuple[float, float]:
    """(images/s of `xai explain` end to end on n images incl. decode + writing, plain-inference images/s)."""
    from PIL import Image

    from xaicli.config import build_config
    from xaicli.explain_run import run_explain

    with tempfile.TemporaryDirectory() as d:
        src = sorted(p for p in (ROOT / "sample_images").iterdir() if p.suffix in (".png", ".jpg"))
        imgs = Path(d) / "imgs"
        imgs.mkdir()
        for i in range(n):
            Image.open(src[i % len(src)]).save(imgs / f"{i:04d}.png", compress_level=1)
        cfg = build_config(
            None,
            {
                "input": str(imgs),
                "output": str(Path(d) / "out"),
                "methods": methods,
                "batch_size": batch,
                "device": device,
                "workers": 2,
            },
        )
        s = run_explain(cfg)
        return s.images_per_second, s.done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", default="", help="comma-separated (default: all registered)")
    ap.add_argument("--peers", action="store_true", help="also time installed peers")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--e2e", type=int, default=0, help="also run `xai explain` end to end on N images")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    )
    lm = load_model(a.model, device=device)
    model = lm.model
    x = make_batch(lm, a.batch, device)
    names = [m for m in a.methods.split(",") if m] or sorted(METHODS)
    names.sort(key=lambda n: n != "saliency")  # saliency first: the F+B unit of the other rows
    with torch.no_grad():
        target = model(x).argmax(1)
    lines = []

    fb = None  # seconds of saliency (1 F + 1 B) on the batch: the F+B unit

    def row(name, sec, base):
        ips = a.batch / sec
        unit = f"{sec / fb:.2f}" if fb else ""
        lines.append(f"| {name} | {ips:.1f} | {sec / base:.2f}x | {unit} |")
        print(lines[-1], flush=True)

    def infer():
        with torch.no_grad():
            return model(x)

    with eval_mode(model):
        # warm up with a full forward+backward first: glibc raises its mmap threshold after large
        # frees, so a fresh process runs plain inference ~1.8x slower (page faults) than after
        # any backward pass; without this the first figures would be measured in another regime
        ctx = make_context(lm)
        warm = build_method("saliency").bind(ctx)
        timeit(lambda: warm(x, target), device, 2, 1)
        timeit(infer, device, a.warmup + 2, 1)
        base = timeit(infer, device, a.warmup, a.repeat)
        dev = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
        head = [
            f"device: {device.type} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"model {a.model}, batch {a.batch}, median of {a.repeat}",
            "",
            "| method | images/s | time vs plain inference | F+B units (saliency = 1) |",
            "|---|---|---|---|",
        ]
        print("\n".join(head), flush=True)
        lines += head
        fb = timeit(lambda: warm(x, target), device, a.warmup, a.repeat)
        row("plain inference (no grad)", base, base)
        layer = None
        for n in names:
            m = build_method(n, **BENCH_PARAMS.get(n, {})).bind(ctx)  # bound once, like a run
            layer = layer or m.resolved().get("layer")
            sec = timeit(lambda m=m: m(x, target), device, a.warmup, a.repeat)
            if n == "saliency":
                fb = sec  # the F+B unit is the saliency row itself when it is timed
            row(n, sec, base)
        if a.peers:
            layer = layer or ctx.adapter.default_layer()
            peer_model = copy.deepcopy(lm)
            for n, fn in peer_fns(peer_model, x, target, layer).items():
                row(n, timeit(fn, device, a.warmup, a.repeat), base)
    if a.e2e:
        ips, done = e2e(a.e2e, a.batch, str(device.type), ",".join(names[:1]) or "gradcam")
        lines.append("")
        lines.append(
            f"end to end `xai explain -m {names[0]}` on {done} images (decode, explain, write PNG+NPY+CSV): "
            f"{ips:.1f} images/s"
        )
        print(lines[-1])
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
