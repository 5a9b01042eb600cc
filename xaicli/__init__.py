"""xaicli: batch explanations (heatmaps) and faithfulness metrics for image classifiers.

Public API (imported lazily so `xai --version` does not load torch):
    load_model(spec, weights=None) -> LoadedModel(model, preprocess, class_names)
    explain(model, x, method="gradcam", target=None, **params) -> maps [B, H, W]
    run(config, progress=True, **options) -> RunSummary   (a whole folder, like `xai explain`)
"""

from ._version import __version__

__all__ = ["__version__", "explain", "load_model", "run"]


def __getattr__(name):
    if name == "explain":
        from .methods import explain

        return explain
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "run":
        return run
    raise AttributeError(name)


def run(config, progress: bool = True, **options):
    """Run a whole config (a YAML path, a dict of config keys, or a RunConfig) like `xai explain`.

    options: force, wait, dry_run, limit, shard (see `xai explain --help`). Returns a RunSummary.
    """
    from .config import RunConfig, build_config
    from .explain_run import RunOptions, run_explain
    from .progress import TqdmProgress

    if isinstance(config, RunConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = build_config(None, config)
    else:
        cfg = build_config(config)
    return run_explain(cfg, progress=TqdmProgress() if progress else None, options=RunOptions(**options))
