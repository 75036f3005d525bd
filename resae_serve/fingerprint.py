"""A fingerprint of a Hugging Face model folder, so a dictionary refuses the wrong model.

The fingerprint is a SHA-256 over the model's config (without keys that change with the saving
library or the dtype it was saved in) and, for each weights file, its safetensors header (tensor
names, dtypes, shapes, offsets) plus the first and last MiB of its data. That tells apart
different architectures, sizes and checkpoints without hashing gigabytes at every start.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from resae_serve.errors import ModelNotFoundError

VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash"}
)
SAMPLE_BYTES = 1 << 20


def _weights_digest(path: Path, digest: hashlib._Hash) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_len))
        f.seek(0)
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(max(size - SAMPLE_BYTES, 0))
        digest.update(f.read(SAMPLE_BYTES))
    digest.update(str(size).encode())


def model_fingerprint(folder: Path) -> str:
    """``sha256:<hex>`` fingerprint of a local Hugging Face model folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{config_path} not found; cannot fingerprint the model")
    config = {k: v for k, v in json.loads(config_path.read_text()).items()
              if k not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise ModelNotFoundError(f"{folder} holds no *.safetensors or *.bin weights")
    for path in weights:
        digest.update(path.name.encode())
        _weights_digest(path, digest)
    return f"sha256:{digest.hexdigest()}"
