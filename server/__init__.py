"""gRPC server, interceptors and client SDK (``resae_serve.server``).

Installed as ``resae_serve.server``: the top-level folder ``server/`` is mapped into the package
by ``pyproject.toml``. Protobuf types live here and never enter the core library.
"""
