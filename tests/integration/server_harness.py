"""A real gRPC server over a real vLLM CPU engine, on loopback, for the server tests.

One engine per test session: the first server builds it (about a minute), later servers with
other settings (auth, TLS, small limits) reuse it through ``engine_factory``. Every server runs
on one event loop in a background thread, so the tests call it with ordinary sync clients.
The dictionary is a small random ReSAE at layers 6, 12, 18, 28 with the embedded model's real
fingerprint and a feature catalog measured on 1,024 held-out Brown tokens; with the catalog
comes a training context measured as the pipeline measures it (BOS first and dropped, the
10× outlier rule, median token norms per layer), so served positions are flagged as for a
trained dictionary.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from resae_serve.artifact import ModelIdentity, save_artifact
from resae_serve.capture import CaptureConfig, capture_activations
from resae_serve.catalog import CatalogConfig, build_catalog, save_catalog
from resae_serve.context import TrainingContext, median_norms
from resae_serve.corpus import load_documents
from resae_serve.fingerprint import model_fingerprint
from resae_serve.models import load_model, resolve_model
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae

T = TypeVar("T")
LAYERS = (6, 12, 18, 28)
D_MODEL, D_SAE, K = 576, 256, 8
START_TIMEOUT_S = 900


def build_dictionary(folder: Path, *, catalog: bool = True) -> Path:
    """A random ReSAE for SmolLM2 (true fingerprint) with an optional feature catalog."""
    torch.manual_seed(0)
    saes = [build_sae(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=D_SAE, k=K))
            for _ in LAYERS]
    affine = [None] + [(torch.eye(D_MODEL) + 0.01 * torch.randn(D_MODEL, D_MODEL),
                        0.01 * torch.randn(D_MODEL)) for _ in LAYERS[1:]]
    resae = ReSAE(LAYERS, saes, [4.0, 2.0, 2.0, 2.0], mode="resae", affine=affine)
    model_dir = resolve_model("smollm2-135m")
    identity = ModelIdentity("smollm2-135m", model_fingerprint(model_dir), "llama", 30, D_MODEL)
    if not catalog:
        save_artifact(resae, folder, identity)
        return folder
    model, tokenizer = load_model("smollm2-135m")
    documents = load_documents("brown", "heldout")[:20]
    capture = CaptureConfig(layers=LAYERS, context_size=128, batch_size=4, max_tokens=2048,
                            progress=False)
    acts = torch.cat([b.acts for b in capture_activations(model, tokenizer, documents, capture)])
    context = TrainingContext(capture.prepend_bos, capture.skip_bos, capture.outlier_norm_ratio,
                              median_norms(acts.float().norm(dim=-1)))
    save_artifact(resae, folder, identity, context=context)
    data = build_catalog(resae, model, tokenizer, documents,
                         CatalogConfig(n_tokens=1024, context_size=128, batch_size=4),
                         progress=False)
    data["layers"]["6"]["features"][3]["label"] = "test label"
    save_catalog(folder, data)
    del model
    return folder


class ServerLoop:
    """An event loop in a daemon thread running servers that share one engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine: Any = None
        self.servers: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600) -> T:
        """Run ``coro`` on the server loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, config: Any, *, share_engine: bool = True) -> Any:
        """Create and start a server (the first builds the engine); wait until it serves."""
        from resae_serve.server.app import build_engine, create_server

        async def shared(_: Any) -> tuple[Any, bool]:
            return self.engine, False               # not owned: only its owner shuts it down

        async def owner(cfg: Any) -> tuple[Any, bool]:
            self.engine, owned = await build_engine(cfg)
            return self.engine, owned

        factory = shared if share_engine and self.engine is not None else owner

        async def go() -> Any:
            server, _ = await create_server(config, engine_factory=factory)
            await server.start()
            await server.wait_ready(START_TIMEOUT_S)
            return server

        server = self.run(go(), timeout=START_TIMEOUT_S + 60)
        self.servers.append(server)
        return server

    def stop(self, server: Any, grace: float = 0.0) -> None:
        self.run(server.stop(grace))
        self.servers.remove(server)

    def close(self) -> None:
        for server in list(self.servers):
            if not server.owns_engine:
                self.stop(server)
        for server in list(self.servers):                 # the engine owner last
            self.stop(server)
        self.engine = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def base_config(dictionary: Path, **overrides: Any) -> Any:
    from resae_serve.server.config import EngineSettings, Limits, ServerConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = ServerConfig(dictionary=dictionary, port=0, metrics_port=0,
                          limits=Limits(max_tokens=64, default_max_tokens=8,
                                        max_prompt_tokens=256, max_edits=8, max_pending=16),
                          engine=EngineSettings(max_num_seqs=8, max_model_len=512,
                                                max_configs=8),
                          grace_s=2.0)
    return replace(config, **overrides)


def assert_idle(server: Any, timeout: float = 30.0) -> None:
    """Wait until the server holds nothing of past calls (``ResaeServer.held``): no open
    stream, admitted call, resident steering config or unfinished engine request."""
    held = server.wait_idle(timeout)
    assert not any(held.values()), f"server still holds {held} after {timeout} s"
