"""paramhub's gRPC server: `paramhub serve` or `python -m paramhub_server`."""

__all__ = ["__version__"]
__version__ = "0.1.0"
