"""xaicli: batch explanations (heatmaps) and faithfulness metrics for image classifiers."""

__version__ = "0.1.0"

from .methods import explain  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["__version__", "explain", "load_model"]
