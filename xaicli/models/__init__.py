from .preprocess import Preprocess
from .registry import LoadedModel, load_model

__all__ = ["LoadedModel", "Preprocess", "load_model"]
