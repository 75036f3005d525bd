"""Server configuration: one frozen dataclass, read from flags and/or a TOML or JSON file.

Every field has a default except the dictionary. A config file holds the same names as the
dataclasses (``[limits]`` and ``[engine]`` tables for the nested ones); flags given on the
command line win over the file. :func:`check_dictionary` is the start-up check that the
dictionary was trained on the model being served.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from resae_serve.artifact import ArtifactError, Manifest, load_artifact, read_manifest
from resae_serve.engine.guards import GuardPolicy, ServerMonitor
from resae_serve.engine.memory import MemoryPlan
from resae_serve.engine.spec import Condition, SteerEdit, SteerVector
from resae_serve.errors import ResaeError
from resae_serve.interventions import InterventionError

logger = logging.getLogger(__name__)


class ServerConfigError(ResaeError):
    """The server cannot start with this configuration (message says what to change)."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits (INVALID_ARGUMENT beyond them) and the queue bound."""

    max_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 64
    """``max_tokens`` when a request leaves it at 0."""
    max_prompt_tokens: int = 1024
    """Longest prompt, in tokens (after the chat template)."""
    max_edits: int = 16
    """Most interventions per request (the engine also caps 8 feature edits per layer)."""
    max_watch: int = 64
    """Most watched features per request."""
    max_top_k: int = 32
    """Largest monitor ``top_k``."""
    max_thresholds: int = 64
    """Most thresholds per request."""
    max_search_chars: int = 4000
    """Longest SearchFeatures text, in characters."""
    max_pending: int = 64
    """Generate/Inspect/Search calls admitted at once (running or waiting for the engine);
    beyond it calls fail fast with RESOURCE_EXHAUSTED instead of queueing."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"limits.{f.name}={value!r}; must be an integer >= 1")
        if self.default_max_tokens > self.max_tokens:
            raise ServerConfigError(f"limits.default_max_tokens={self.default_max_tokens} is "
                                    f"above limits.max_tokens={self.max_tokens}")


@dataclass(frozen=True)
class WatchSettings:
    """Server-wide monitoring (the ``[watch]`` table): monitors on all traffic, policy
    interventions, ``WatchEvents`` buffers and the event log. ``monitors`` and
    ``interventions`` are lists of tables::

        [[watch.monitors]]
        name = "toxicity"            # label in metrics and events
        layer = 12
        feature = 345
        threshold = 4.0              # fires where the code is >= threshold
        action = "stop"              # record | stop | steer
        # edit = {layer = 18, feature = 7, mode = "clamp", value = 0.0}   (action steer)
        # include_out_of_distribution = false

        [[watch.interventions]]      # applied to every sampled request
        layer = 18
        feature = 7
        mode = "clamp"
        value = 0.0
        when = {layer = 12, feature = 345, value = 4.0}
    """

    monitors: tuple[ServerMonitor, ...] = ()
    interventions: tuple[SteerEdit | SteerVector, ...] = ()
    sample: float = 1.0
    """Fraction of requests the monitors and interventions apply to (stable per request id)."""
    subscriber_buffer: int = 1024
    """Events buffered per ``WatchEvents`` subscriber; beyond it the oldest are dropped."""
    event_log: Path | None = None
    """A JSON-lines file of every event (None: no log)."""
    event_log_max_bytes: int = 64 * 2**20
    """Size at which the event log is rotated (``.1``, ``.2`` ... kept)."""
    event_log_backups: int = 3
    """Rotated event logs kept."""

    def __post_init__(self) -> None:
        for name in ("subscriber_buffer", "event_log_max_bytes", "event_log_backups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"watch.{name}={value!r}; must be an integer >= 1")
        try:
            self.policy()
        except InterventionError as exc:
            raise ServerConfigError(f"watch: {exc}") from exc

    def policy(self) -> GuardPolicy:
        """What the engine applies to each request."""
        return GuardPolicy(self.monitors, float(self.sample), self.interventions)


def _condition(data: Any, where: str) -> Condition | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ServerConfigError(f"{where}.when={data!r}; expected a table "
                                "{layer, feature, value[, sticky, include_out_of_distribution]}")
    allowed = {"layer", "feature", "value", "sticky", "include_out_of_distribution"}
    _only(data, allowed, f"{where}.when", required={"layer", "feature", "value"})
    try:
        return Condition(int(data["layer"]), int(data["feature"]), float(data["value"]),
                         bool(data.get("sticky", False)),
                         bool(data.get("include_out_of_distribution", False)))
    except (TypeError, ValueError, InterventionError) as exc:
        raise ServerConfigError(f"{where}.when: {exc}") from exc


def _only(data: dict[str, Any], allowed: set[str], where: str, *,
          required: Collection[str] = ()) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ServerConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ServerConfigError(f"{where}: field(s) {missing} required")


def _intervention(data: Any, where: str) -> SteerEdit | SteerVector:
    """A ``{layer, feature, mode, value, phase, when}`` or ``{layer, vector, phase, when}``
    table."""
    if not isinstance(data, dict):
        raise ServerConfigError(f"{where}={data!r}; expected a table")
    try:
        if "vector" in data:
            _only(data, {"layer", "vector", "phase", "when"}, where, required={"layer"})
            return SteerVector(int(data["layer"]), tuple(float(x) for x in data["vector"]),
                               data.get("phase", "all"), _condition(data.get("when"), where))
        _only(data, {"layer", "feature", "mode", "value", "phase", "when"}, where,
              required={"layer", "feature", "mode"})
        return SteerEdit(int(data["layer"]), int(data["feature"]), data["mode"],
                         float(data.get("value", 0.0)), data.get("phase", "all"),
                         _condition(data.get("when"), where))
    except (TypeError, ValueError, InterventionError) as exc:
        raise ServerConfigError(f"{where}: {exc}") from exc


def _monitor(data: Any, where: str) -> ServerMonitor:
    if not isinstance(data, dict):
        raise ServerConfigError(f"{where}={data!r}; expected a table {{name, layer, feature, "
                                "threshold, action}")
    _only(data, {"name", "layer", "feature", "threshold", "action", "edit",
                 "include_out_of_distribution"}, where,
          required={"name", "layer", "feature", "threshold"})
    edit = data.get("edit")
    parsed = None if edit is None else _intervention(edit, f"{where}.edit")
    if parsed is not None and not isinstance(parsed, SteerEdit):
        raise ServerConfigError(f"{where}.edit: a feature edit {{layer, feature, mode, value}} "
                                "(vectors are not allowed here)")
    try:
        return ServerMonitor(str(data["name"]), int(data["layer"]), int(data["feature"]),
                             float(data["threshold"]), data.get("action", "record"), parsed,
                             bool(data.get("include_out_of_distribution", False)))
    except (TypeError, ValueError, InterventionError) as exc:
        raise ServerConfigError(f"{where}: {exc}") from exc


def _watch(data: Any, where: str) -> WatchSettings:
    if not isinstance(data, dict):
        raise ServerConfigError(f"{where}={data!r}; expected a table")
    data = dict(data)
    for name, parse in (("monitors", _monitor), ("interventions", _intervention)):
        items = data.get(name, [])
        if not isinstance(items, list):
            raise ServerConfigError(f"{where}.{name}: expected a list of tables")
        data[name] = tuple(parse(x, f"{where}.{name}[{n}]") for n, x in enumerate(items))
    if data.get("event_log") is not None:
        data["event_log"] = Path(data["event_log"])
    return _nested(WatchSettings, data, where)


MAX_BACKOFF_S = 60.0
"""Longest wait between two engine rebuild attempts."""
DTYPES = ("float32", "bfloat16", "float16", "auto")
OP_MODES = ("graph", "split")   # resae_serve.engine.llm.OP_MODES (no vLLM import here)
RUNTIMES = ("auto", "torch", "onnxruntime", "tensorrt")  # engine.runtime_choice.RUNTIMES


@dataclass(frozen=True)
class EngineSettings:
    """vLLM engine arguments the server exposes (see ``resae_serve.engine.llm.engine_kwargs``)."""

    max_num_seqs: int = 16
    """Requests decoded together."""
    max_model_len: int | None = None
    """Prompt plus generated tokens per request; None takes the model's own limit (its
    config's ``max_position_embeddings``), see :func:`with_model_defaults`."""
    max_configs: int = 32
    """Distinct steering configs resident at once; more wait in admission."""
    enforce_eager: bool = False
    """Disable torch.compile / CUDA graphs (fallback; slower)."""
    dtype: str = "float32"
    kv_cache_gib: float | None = None
    """KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``). None: on CPU, what the
    configuration needs (``max_num_seqs × max_model_len`` tokens, see
    ``resae_serve.engine.memory``; ``VLLM_CPU_KVCACHE_SPACE`` in the environment, whole GiB,
    wins over that); on GPU, vLLM's sizing from ``gpu_memory_utilization``."""
    gpu_memory_utilization: float | None = None
    """GPU only: the share of GPU memory vLLM may use for weights, activations and KV cache
    (vLLM's meaning; None keeps its default, 0.9). Ignored when ``kv_cache_gib`` is set."""
    tensor_parallel_size: int = 1
    op_mode: str = "graph"
    """GPU only: how the op meets vLLM's CUDA graphs, ``graph`` (captured with the forward) or
    ``split`` (runs between captured pieces); see ``resae_serve.engine.llm.compilation_config``."""
    runtime: str = "auto"
    """The feature runtime the monitor encodes with: ``auto`` (onnxruntime on a CPU host;
    TensorRT or onnxruntime's GPU providers on a GPU host when installed, else torch), ``torch``,
    ``onnxruntime`` or ``tensorrt`` (see ``resae_serve.engine.runtime_choice``). Steering
    always runs in the compiled torch graph."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_configs", "tensor_parallel_size"):
            value = getattr(self, name)
            if name == "max_model_len" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"engine.{name}={value!r}; must be an integer >= 1")
        kv = self.kv_cache_gib
        if kv is not None and (not isinstance(kv, int | float) or isinstance(kv, bool)
                               or not math.isfinite(kv) or kv <= 0):
            raise ServerConfigError(f"engine.kv_cache_gib={kv!r}; must be a number of GiB > 0")
        gpu = self.gpu_memory_utilization
        if gpu is not None and (not isinstance(gpu, int | float) or not 0 < gpu <= 1):
            raise ServerConfigError(f"engine.gpu_memory_utilization={gpu!r}; allowed (0, 1]")
        if self.op_mode not in OP_MODES:
            raise ServerConfigError(f"engine.op_mode={self.op_mode!r}; allowed: "
                                    f"{', '.join(OP_MODES)}")
        if self.dtype not in DTYPES:
            raise ServerConfigError(f"engine.dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.runtime not in RUNTIMES:
            raise ServerConfigError(f"engine.runtime={self.runtime!r} (--runtime); allowed: "
                                    f"{', '.join(RUNTIMES)}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``resae serve`` needs."""

    dictionary: Path
    """Dictionary folder (``resae train`` output; ``features.json`` enables the catalog RPCs),
    or an export folder (``resae export`` output), which serves the dictionary its manifest
    names (:func:`with_served_folders`)."""
    export: Path | None = None
    """Export folder of the dictionary for the ONNX runtimes (checked against it); None: the
    cached export, built on first use (``<resae cache>/exports/``)."""
    model: str = "smollm2-135m"
    """Embedded model name or local Hugging Face folder."""
    host: str = "127.0.0.1"
    """Address to bind (``0.0.0.0`` for every interface)."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int | None = 9400
    """Prometheus ``/metrics`` HTTP port; None disables it, 0 picks a free one."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API (vLLM's app on the same engine, with the same
    auth, TLS and limits); None disables it, 0 picks a free one."""
    limits: Limits = field(default_factory=Limits)
    engine: EngineSettings = field(default_factory=EngineSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    """Server-wide monitors, policy interventions, WatchEvents and the event log."""
    auth_token_file: Path | None = None
    """Bearer tokens, one per line; with ``auth`` also ``RESAE_AUTH_TOKENS`` (comma-separated)."""
    auth: bool = False
    """Require a bearer token on every RPC but health."""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """With a CA file, clients must present a certificate it signed (mutual TLS)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message either way."""
    grace_s: float = 10.0
    """Seconds in-flight streams get to finish on SIGTERM/SIGINT before they are cancelled."""
    restart_engine: bool = True
    """Rebuild an engine this server owns when it dies (health NOT_SERVING meanwhile); off
    where an orchestrator restarts the whole process instead."""
    restart_attempts: int = 5
    """Rebuild attempts after one death; when all fail the server stays NOT_SERVING."""
    restart_backoff_s: float = 2.0
    """Seconds before the first rebuild attempt; doubles after each failed one (at most
    ``MAX_BACKOFF_S``)."""

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ServerConfigError(f"{name}={value}; allowed 0..65535")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ServerConfigError("tls_cert_file and tls_key_file go together; give both "
                                    "(or neither for plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ServerConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.max_message_bytes < 1024:
            raise ServerConfigError(f"max_message_bytes={self.max_message_bytes}; at least 1024")
        if self.grace_s < 0:
            raise ServerConfigError(f"grace_s={self.grace_s}; must be >= 0")
        if not isinstance(self.restart_engine, bool):
            raise ServerConfigError(f"restart_engine={self.restart_engine!r}; true or false")
        if (not isinstance(self.restart_attempts, int) or isinstance(self.restart_attempts, bool)
                or self.restart_attempts < 1):
            raise ServerConfigError(f"restart_attempts={self.restart_attempts!r}; must be an "
                                    "integer >= 1 (turn restarts off with restart_engine=false)")
        if not 0 <= self.restart_backoff_s <= MAX_BACKOFF_S:
            raise ServerConfigError(f"restart_backoff_s={self.restart_backoff_s}; allowed "
                                    f"0..{MAX_BACKOFF_S:g}")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


_PATHS = {"dictionary", "export", "auth_token_file", "tls_cert_file", "tls_key_file",
          "tls_client_ca_file"}


def _nested(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ServerConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ServerConfigError(f"{where}: {exc}") from exc


def config_from_mapping(data: dict[str, Any], where: str = "config") -> ServerConfig:
    """A :class:`ServerConfig` from plain data (a parsed file), with errors naming the field."""
    data = dict(data)
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ServerConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    if "dictionary" not in data:
        raise ServerConfigError(f"{where}: field 'dictionary' is required (a dictionary folder)")
    for name in _PATHS & set(data):
        if data[name] is not None:
            data[name] = Path(data[name])
    if "limits" in data:
        data["limits"] = _nested(Limits, data["limits"], f"{where} [limits]")
    if "engine" in data:
        data["engine"] = _nested(EngineSettings, data["engine"], f"{where} [engine]")
    if "watch" in data:
        data["watch"] = _watch(data["watch"], f"{where} [watch]")
    try:
        return ServerConfig(**data)
    except TypeError as exc:
        raise ServerConfigError(f"{where}: {exc}") from exc


def load_config_file(path: Path) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.json`` config file into plain data."""
    if not path.is_file():
        raise ServerConfigError(f"config file {path} not found")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ServerConfigError(f"{path}: expected a JSON object at the top level")
            return data
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ServerConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    raise ServerConfigError(f"config file {path}: suffix {path.suffix!r}; use .toml or .json")


def with_overrides(config: ServerConfig, **overrides: Any) -> ServerConfig:
    """``config`` with the non-None ``overrides`` (``limits_<name>`` / ``engine_<name>`` for
    the nested tables), as flags override a file."""
    top: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name.startswith("limits_"):
            limits[name.removeprefix("limits_")] = value
        elif name.startswith("engine_"):
            engine[name.removeprefix("engine_")] = value
        else:
            top[name] = value
    return replace(config, **top, limits=replace(config.limits, **limits),
                   engine=replace(config.engine, **engine))


def with_model_defaults(config: ServerConfig) -> ServerConfig:
    """``config`` with the settings left to the model filled in from it: ``max_model_len``
    (the model's own context limit)."""
    if config.engine.max_model_len is not None:
        return config
    from resae_serve.families import model_max_len
    from resae_serve.models import resolve_model

    limit = model_max_len(resolve_model(config.model))
    if limit is None:
        raise ServerConfigError(f"model={config.model!r} declares no context limit "
                                "(max_position_embeddings); set engine.max_model_len "
                                "(--max-model-len)")
    logger.info("max_model_len %d (the model's own limit)", limit)
    return replace(config, engine=replace(config.engine, max_model_len=limit))


def with_served_folders(config: ServerConfig) -> ServerConfig:
    """``config`` with ``dictionary`` an export folder resolved: the dictionary its manifest
    names becomes ``dictionary`` and the folder ``export`` (checked by fingerprint when the
    engine starts)."""
    from resae_serve.engine.runtime_choice import served_folders
    from resae_serve.export.errors import ExportError

    try:
        dictionary, export = served_folders(Path(config.dictionary))
    except (ExportError, ValueError) as exc:
        raise ServerConfigError(f"dictionary={config.dictionary}: {exc}") from exc
    if export is None:
        return config
    if config.export is not None and Path(config.export).resolve() != export.resolve():
        raise ServerConfigError(f"dictionary={config.dictionary} is an export folder, and "
                                f"export={config.export} names another; give one of them")
    logger.info("serving the export %s of dictionary %s", export, dictionary)
    return replace(config, dictionary=dictionary, export=export)


def check_runtime(config: ServerConfig, *, cuda: bool | None = None) -> str:
    """Refuse an ``engine.runtime`` that cannot run on this host, naming ``--runtime`` and
    what is allowed; returns the runtime it means here (``auto`` resolved)."""
    from resae_serve.engine.runtime_choice import RuntimeUnavailableError, choose_runtime

    try:
        return choose_runtime(config.engine.runtime, cuda=on_gpu() if cuda is None else cuda,
                              log=False).backend     # the engine's start logs the choice
    except RuntimeUnavailableError as exc:
        raise ServerConfigError(str(exc)) from exc


def check_export(config: ServerConfig) -> None:
    """Refuse an export folder given to serve (``export``) whose layout or fingerprint do not
    match the dictionary, naming the field, before the engine starts. (A cached export is
    checked, or built, when the engine starts.)"""
    if config.export is None or check_runtime(config) == "torch":
        return
    from resae_serve.engine.runtime_choice import prepare_export
    from resae_serve.export.errors import ExportError

    try:
        prepare_export(Path(config.dictionary), Path(config.export))
    except ExportError as exc:
        raise ServerConfigError(f"export={config.export}: {exc}") from exc


def check_dictionary(config: ServerConfig) -> Manifest:
    """Refuse a model the engine does not hook, or a dictionary that does not fit it (model
    type, depth, width, layers, weight fingerprint), before anything heavy starts. Returns the
    dictionary's manifest."""
    from resae_serve.families import UnsupportedModelError, check_model_fits, model_architecture
    from resae_serve.models import resolve_model

    try:
        manifest = read_manifest(Path(config.dictionary))
    except ArtifactError as exc:
        raise ServerConfigError(f"dictionary={config.dictionary}: {exc}") from exc
    folder = resolve_model(config.model)
    try:
        model_architecture(folder)
        fingerprint = check_model_fits(folder, Path(config.dictionary))
    except UnsupportedModelError as exc:
        raise ServerConfigError(f"model={config.model!r}: {exc}") from exc
    try:   # every tensor file against its recorded SHA-256, shapes, dtypes, finiteness
        load_artifact(Path(config.dictionary), expect_fingerprint=fingerprint)
    except ArtifactError as exc:
        raise ServerConfigError(f"dictionary={config.dictionary} is damaged: {exc}. Restore it "
                                "from the training output or retrain it") from exc
    return manifest


KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM's CPU KV cache size in whole GiB; read as the KV size when ``kv_cache_gib`` is unset."""


def on_gpu() -> bool:
    """Whether the engine will run on a GPU (a CUDA build of torch that sees one)."""
    import torch

    return bool(torch.cuda.is_available())


def memory_plan(config: ServerConfig, *, gpu: bool | None = None) -> MemoryPlan:
    """What the engine for ``config`` will hold (:mod:`resae_serve.engine.memory`). The KV
    cache: ``engine.kv_cache_gib`` if set, else ``VLLM_CPU_KVCACHE_SPACE`` (CPU), else on CPU
    what the configuration needs and on GPU vLLM's own sizing."""
    from resae_serve.engine.memory import GIB, MemoryPlanError, plan_memory
    from resae_serve.models import resolve_model

    config = with_model_defaults(config)
    e = config.engine
    gpu = on_gpu() if gpu is None else gpu
    kv_bytes, source = None, ""
    if e.kv_cache_gib is not None:
        kv_bytes, source = int(e.kv_cache_gib * GIB), "engine.kv_cache_gib"
    elif not gpu and os.environ.get(KV_ENV, "") != "":
        try:
            kv_bytes, source = int(os.environ[KV_ENV]) * GIB, KV_ENV
        except ValueError as exc:
            raise ServerConfigError(f"{KV_ENV}={os.environ[KV_ENV]!r}; vLLM reads a whole "
                                    "number of GiB (or unset it)") from exc
    assert e.max_model_len is not None                      # with_model_defaults set it
    try:
        return plan_memory(resolve_model(config.model), Path(config.dictionary), dtype=e.dtype,
                           max_num_seqs=e.max_num_seqs, max_model_len=e.max_model_len,
                           max_configs=e.max_configs, kv_cache_bytes=kv_bytes,
                           kv_source=source, on_gpu=gpu)
    except MemoryPlanError as exc:
        raise ServerConfigError(f"model={config.model!r}: {exc}") from exc


def check_memory(config: ServerConfig, *, available: int | None = None,
                 gpu: bool | None = None) -> MemoryPlan:
    """Refuse a configuration whose engine would not fit the memory available now
    (``available`` bytes; default what the kernel reports), naming the numbers and the
    setting to change; returns the plan. On GPU the plan is returned unchecked: vLLM checks
    GPU memory against ``gpu_memory_utilization`` itself."""
    from resae_serve.engine.memory import available_memory, gib

    plan = memory_plan(config, gpu=gpu)
    longest = with_model_defaults(config).engine.max_model_len or 0
    if plan.kv_cache is not None and plan.kv_tokens < longest:
        raise ServerConfigError(
            f"the KV cache ({gib(plan.kv_cache)}, {plan.kv_source}) holds {plan.kv_tokens} "
            f"tokens, fewer than one sequence of engine.max_model_len={longest}; raise "
            f"--kv-cache-gib to at least {gib(plan.kv_bytes_per_token * longest, up=True)} or "
            "lower --max-model-len")
    if plan.on_gpu:
        return plan
    available = available_memory() if available is None else available
    if available is None:
        logger.warning("cannot read the memory available (no /proc/meminfo or psutil); "
                       "not checking that the engine fits")
        return plan
    if plan.total > available:
        change = {"engine.kv_cache_gib": "lower --kv-cache-gib",
                  KV_ENV: f"lower {KV_ENV} (whole GiB) or set --kv-cache-gib"}.get(
            plan.kv_source, "lower --max-num-seqs or --max-model-len (the KV cache is sized "
            "for max_num_seqs × max_model_len tokens), or set a smaller --kv-cache-gib")
        raise ServerConfigError(
            f"the engine needs about {gib(plan.total)} of memory ({plan.describe()}) but "
            f"{gib(available)} is available: {change}, or free memory")
    return plan
