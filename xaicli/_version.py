"""The package version (layer 0: imported by the package, the CLI and run.yaml)."""

__version__ = "0.1.0"
