"""Generate the Python gRPC code of ``proto/resae/v1/*.proto`` into ``server/v1/``.

The generated modules are committed (so installing needs no protoc); a test regenerates them
into a temporary folder and fails when the committed copy is stale. Run after editing a
``.proto``::

    python -m resae_serve.server.codegen

Needs ``grpcio-tools`` (the ``dev`` extra). protoc writes ``from resae.v1 import ...``; the
imports are rewritten to ``resae_serve.server.v1`` so no top-level ``resae`` package exists.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PACKAGE_DIR = Path(__file__).resolve().parent / "v1"
PYTHON_PACKAGE = "resae_serve.server.v1"
_IMPORT = re.compile(r"^from resae\.v1 import ", re.MULTILINE)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every ``resae/v1/*.proto`` into ``out_dir`` (``*_pb2.py``, ``.pyi``, ``_grpc``)."""
    from grpc_tools import protoc  # dev dependency

    protos = sorted((proto_root / "resae" / "v1").glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / 'resae' / 'v1'}")
    include = Path(protoc.__file__).parent / "_proto"      # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                *(str(p.relative_to(proto_root)) for p in protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
        written = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted((Path(tmp) / "resae" / "v1").iterdir()):
            text = _IMPORT.sub(f"from {PYTHON_PACKAGE} import ", source.read_text())
            target = out_dir / source.name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="target folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
