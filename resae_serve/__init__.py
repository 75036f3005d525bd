"""resae-serve: train, export and serve Residualized Sparse Autoencoders (ReSAEs).

Import names: ``resae_serve`` (this library), ``resae_serve.export`` (ONNX / TensorRT) and
``resae_serve.server`` (gRPC). Heavy optional dependencies are imported where they are used.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("resae-serve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
