"""xaicli: batch explanations (heatmaps) and faithfulness metrics for image classifiers.

Public API (imported lazily so `xai --version` does not load torch):
    load_model(spec, weights=None) -> LoadedModel(model, preprocess, class_names)
    explain(model, x, method="gradcam", target=None, **params) -> maps [B, H, W]
"""

__version__ = "0.1.0"

__all__ = ["__version__", "explain", "load_model"]


def __getattr__(name):
    if name == "explain":
        from .methods import explain

        return explain
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(name)
