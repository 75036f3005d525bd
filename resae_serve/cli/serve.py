"""``resae serve``: the gRPC server over a vLLM engine with the ReSAE hook.

Flags override the config file (``--config serve.toml``; same names, ``[limits]`` and
``[engine]`` tables). The folder served is a dictionary folder or an export folder of one;
``--runtime`` picks what computes the monitored features (steering always runs in the
compiled torch graph). The server refuses to start, with the reason, when the dictionary was
trained on another model (fingerprint), or its layers or width do not fit the model, or when
the engine (weights, KV cache, dictionary, tables) would not fit the memory available. An
engine that dies is rebuilt (``--restart-attempts``, ``--no-restart-engine``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from resae_serve.server.config import (
    ServerConfig,
    ServerConfigError,
    config_from_mapping,
    load_config_file,
    with_overrides,
)

logger = logging.getLogger(__name__)

HELP = ("serve steering and monitoring over gRPC and optionally an OpenAI-compatible HTTP "
        "API (vLLM engine + dictionary)")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("serve", help=HELP, description=__doc__)
    p.add_argument("dictionary", nargs="?", type=Path,
                   help="dictionary folder (resae train output) or an export folder of one "
                        "(resae export output); or set it in --config")
    p.add_argument("--config", type=Path, help="TOML or JSON file with the settings below")
    p.add_argument("--model", help="embedded model name or local HF folder "
                   "(default smollm2-135m)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus /metrics port (default 9400; -1 = off)")
    p.add_argument("--http-port", type=int,
                   help="also serve the OpenAI-compatible HTTP API (vLLM's /v1/completions, "
                        "/v1/chat/completions, /v1/models) on this port (default off; 0 = any "
                        "free; -1 = off)")
    p.add_argument("--auth-token-file", type=Path,
                   help="bearer tokens, one per line (also RESAE_AUTH_TOKENS with --auth)")
    p.add_argument("--auth", action="store_true", default=None,
                   help="require a bearer token (tokens from RESAE_AUTH_TOKENS and the file)")
    p.add_argument("--tls-cert", dest="tls_cert_file", type=Path, help="server certificate PEM")
    p.add_argument("--tls-key", dest="tls_key_file", type=Path, help="server private key PEM")
    p.add_argument("--tls-client-ca", dest="tls_client_ca_file", type=Path,
                   help="CA for client certificates (mutual TLS)")
    p.add_argument("--grace", dest="grace_s", type=float,
                   help="seconds to drain streams on SIGTERM (default 10)")
    p.add_argument("--max-tokens", dest="limits_max_tokens", type=int)
    p.add_argument("--max-prompt-tokens", dest="limits_max_prompt_tokens", type=int)
    p.add_argument("--max-edits", dest="limits_max_edits", type=int)
    p.add_argument("--max-watch", dest="limits_max_watch", type=int)
    p.add_argument("--max-pending", dest="limits_max_pending", type=int,
                   help="calls in flight before RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--max-num-seqs", dest="engine_max_num_seqs", type=int)
    p.add_argument("--max-model-len", dest="engine_max_model_len", type=int,
                   help="prompt + generated tokens per request (default: the model's own "
                        "limit, max_position_embeddings)")
    p.add_argument("--max-configs", dest="engine_max_configs", type=int,
                   help="distinct steering configs resident at once (default 32)")
    p.add_argument("--enforce-eager", dest="engine_enforce_eager", action="store_true",
                   default=None, help="no torch.compile (fallback; slower)")
    p.add_argument("--op-mode", dest="engine_op_mode", choices=("graph", "split"),
                   help="GPU: the op inside vLLM's CUDA graphs (graph, default) or between "
                        "captured pieces (split); ignored on CPU")
    p.add_argument("--runtime", dest="engine_runtime",
                   choices=("auto", "torch", "onnxruntime", "tensorrt"),
                   help="what the monitor encodes features with (default auto: onnxruntime on "
                        "a CPU host, TensorRT / onnxruntime's GPU providers on a GPU host when "
                        "installed, else torch); the ONNX runtimes read the export folder "
                        "served, or the dictionary's cached export, built once on first use")
    p.add_argument("--kv-cache-gib", dest="engine_kv_cache_gib", type=float,
                   help="KV cache size in GiB (default on CPU: what --max-num-seqs × "
                        "--max-model-len tokens need, +10 %%; on GPU: vLLM's share from "
                        "--gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", dest="engine_gpu_memory_utilization",
                   type=float, help="GPU: share of GPU memory vLLM may use (vLLM's meaning, "
                                    "default 0.9); ignored on CPU")
    p.add_argument("--no-restart-engine", dest="restart_engine", action="store_false",
                   default=None, help="do not rebuild the engine when it dies (stay "
                                      "NOT_SERVING; for orchestrators that restart the process)")
    p.add_argument("--restart-attempts", type=int,
                   help="engine rebuild attempts after a death (default 5)")
    p.add_argument("--restart-backoff", dest="restart_backoff_s", type=float,
                   help="seconds before the first rebuild attempt, doubling (default 2)")
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of parsed arguments (file first, then flags)."""
    data = load_config_file(args.config) if args.config else {}
    if args.dictionary is not None:
        data["dictionary"] = str(args.dictionary)
    if "dictionary" not in data:
        raise ServerConfigError("no dictionary: pass a dictionary folder (e.g. runs/demo-resae) "
                                "or set 'dictionary' in --config")
    config = config_from_mapping(data, str(args.config or "flags"))
    overrides = {k: v for k, v in vars(args).items()
                 if k not in {"dictionary", "config", "run", "command", "verbose", "quiet"}}
    for name in ("metrics_port", "http_port"):
        if overrides.pop(name, None) == -1:
            config = replace(config, **{name: None})
        elif getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return with_overrides(config, **overrides)


def run(args: argparse.Namespace) -> int:
    from resae_serve.server.app import serve

    asyncio.run(serve(build_config(args)))
    return 0
