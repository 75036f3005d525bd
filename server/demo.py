"""The end-to-end demo of ``make demo``: serve a dictionary's ONNX export, steer and watch it.

Makes sure the export folder (``--export``, e.g. ``runs/demo-resae.onnx``) holds the current
dictionary in the current export format (exports and validates it again when not), starts
``resae serve EXPORT`` as a child process (its log goes to ``<dictionary>.server.log``): the
server runs the dictionary the export names, and its monitor encodes features through the
export on onnxruntime (``--runtime auto`` on a CPU host). It waits for the gRPC health service
to report SERVING, then from the client SDK:

1. describes the served dictionary and says which runtime computes the features (GetDictionary's
   ``backend``);
2. searches the feature catalog for a text about weddings and picks the feature most active
   on it (the largest mean code among the top hits);
3. completes the same prompt greedily without and with that feature added (side by side);
4. shows the features monitored on every token of the steered completion;
5. asks the OpenAI-compatible HTTP API (``--http-port``) for the same steered completion, with
   steering in the body field ``resae`` (the JSON form of the gRPC messages);

and finally stops the server with SIGTERM (graceful drain) and checks it exited cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from google.protobuf import json_format

from resae_serve.cli.render_client import (
    completion_table,
    dictionary_text,
    search_hits,
    side_by_side,
)
from resae_serve.server.client import ResaeClient, add, monitor
from resae_serve.server.healthcheck import check_health
from resae_serve.server.v1 import resae_pb2 as pb

logger = logging.getLogger("resae_serve.demo")
SEARCH_TEXT = "She married him at the church wedding, and the bride wore white."
PROMPT = "Yesterday I went to the"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float,
                 log: Path) -> None:
    """Poll the health service until SERVING; fail early if the server process exits."""
    start = time.monotonic()
    last_note = start
    while not check_health(target, timeout=2).serving:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} while "
                               f"loading; see {log}")
        now = time.monotonic()
        if now - start > timeout:
            raise TimeoutError(f"the server was not SERVING after {timeout:.0f} s; see {log}")
        if now - last_note >= 15:
            logger.info("engine still loading (%.0f s; first start compiles the model)",
                        now - start)
            last_note = now
        time.sleep(1.0)
    logger.info("server SERVING on %s after %.0f s", target, time.monotonic() - start)


def _section(title: str) -> None:
    sys.stdout.write(f"\n=== {title} ===\n")


def ensure_export(dictionary: Path, export: Path) -> Path:
    """``export``, exported (and validated) from ``dictionary`` again unless it already holds
    this dictionary in this resae-serve's export format."""
    from resae_serve.engine.runtime_choice import prepare_export
    from resae_serve.export.convert import export_artifact
    from resae_serve.export.errors import ExportError
    from resae_serve.export.validate import validate_export

    try:
        return prepare_export(dictionary, export)
    except ExportError as exc:
        logger.info("exporting %s to %s (%s)", dictionary, export,
                    "not there yet" if not export.exists() else exc)
    export_artifact(dictionary, export)
    report = validate_export(export)
    logger.info("exported and validated %s: %d checks passed", export, len(report.checks))
    return export


def run_demo(client: ResaeClient, *, width: int, steer_value: float, max_tokens: int,
             http_port: int | None = None, model: str = "smollm2-135m") -> None:
    """The client half of the demo (needs a SERVING server with a feature catalog; with
    ``http_port``, its OpenAI-compatible HTTP API too)."""
    _section("served dictionary (GetDictionary)")
    described = client.get_dictionary()
    sys.stdout.write(dictionary_text(described) + "\n")
    sys.stdout.write(f"features are computed by: {described.backend} (the server's feature "
                     "runtime; steering runs in the compiled torch graph)\n")

    _section("feature search (SearchFeatures)")
    hits = list(client.search_features(SEARCH_TEXT, top=6).hits)
    sys.stdout.write(search_hits(hits, SEARCH_TEXT) + "\n")
    if not hits:
        raise RuntimeError("the search found no features; is the catalog empty?")
    chosen = max(hits, key=lambda h: h.mean_on_text).feature
    sys.stdout.write(f"\nsteering with layer {chosen.layer} feature {chosen.feature} (the hit "
                     f"most active on the text), add {steer_value:g}\n")

    _section("plain versus steered completion (Generate, greedy)")
    steer = [add(chosen.layer, chosen.feature, steer_value)]
    plain = client.complete(PROMPT, max_tokens=max_tokens, temperature=0.0)
    steered = client.complete(PROMPT, max_tokens=max_tokens, temperature=0.0,
                              interventions=steer)
    sys.stdout.write(f"prompt: {PROMPT!r}\n")
    sys.stdout.write(side_by_side(plain.text, steered.text, width, titles=(
        "without steering", f"with +{steer_value:g} × L{chosen.layer}/{chosen.feature}"))
        + "\n")

    _section("features monitored per token of the steered completion (Generate + monitor)")
    sys.stdout.write(f"top 3 features at layer {chosen.layer}, and the steered feature's value "
                     "(the steering applies to every token, prompt included)\n")
    watched = client.complete(PROMPT, max_tokens=8, temperature=0.0, interventions=steer,
                              monitor=monitor([chosen.layer], top_k=3, watch=[chosen.feature]))
    sys.stdout.write(completion_table(watched, watch=[chosen.feature]) + "\n")
    if http_port is None:
        return

    _section("the same steered completion over HTTP (POST /v1/completions, OpenAI format)")
    resae = json_format.MessageToDict(pb.ResaeOptions(interventions=steer))
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
            "resae": resae}
    sys.stdout.write(f"body: {json.dumps(body)}\n")
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        text = json.loads(reply.read())["choices"][0]["text"]
    sys.stdout.write(f"text: {text!r}\n")
    sys.stdout.write("(the same as the gRPC steered completion)\n" if text == steered.text
                     else "(differs from the gRPC one: vLLM tokenized the prompt itself)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dictionary", type=Path, help="dictionary folder with features.json")
    parser.add_argument("--export", type=Path,
                        help="export folder to serve (exported from the dictionary when "
                             "missing or stale); default: serve the dictionary folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 = a free one)")
    parser.add_argument("--steer-value", type=float, default=8.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the engine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    port = args.port or _free_port()
    http_port = _free_port()
    target = f"127.0.0.1:{port}"
    log = args.dictionary.with_name(args.dictionary.name + ".server.log")
    served = args.dictionary
    if args.export is not None:
        served = ensure_export(args.dictionary, args.export)
    command = [sys.executable, "-m", "resae_serve", "serve", str(served),
               "--model", args.model, "--port", str(port), "--metrics-port", "-1",
               "--http-port", str(http_port),
               "--max-num-seqs", "8", "--grace", "10"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    logger.info("starting: %s (log: %s)", " ".join(command), log)
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(target, process, args.timeout, log)
        width = min(shutil.get_terminal_size((100, 24)).columns, 120)
        with ResaeClient(target, timeout=300) as client:
            run_demo(client, width=width, steer_value=args.steer_value,
                     max_tokens=args.max_tokens, http_port=http_port, model=args.model)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                logger.error("the server did not stop within 60 s of SIGTERM; killing it")
                process.kill()
                process.wait()
    logger.info("server stopped (exit status %d)", process.returncode)
    return 0 if process.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
