"""The package version (one place: the CLI, ONNX metadata and manifests read it)."""
__version__ = "0.1.0"
