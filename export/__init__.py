"""ONNX and TensorRT export of ReSAE dictionaries (``resae_serve.export``).

Installed as ``resae_serve.export``: the top-level folder ``export/`` is mapped into the package
by ``pyproject.toml``, so no generic ``export`` module lands in site-packages.
"""
