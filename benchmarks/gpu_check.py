"""One-shot GPU check: the serving op, SAE training and encode throughput, and ``resae train``.

Runs in at most ~8 minutes on one H100/H200 where only torch, transformers, tokenizers, onnx
and onnxruntime are installed (no vLLM, no pip install of this package)::

    PYTHONPATH=. python3 -m benchmarks.gpu_check --out $OUT/gpu_check.md
    python -m benchmarks.gpu_check --device cpu --quick      # ~30 s; `make test` runs this

Options: ``--device auto|cpu|cuda``, ``--quick`` (tiny shapes, few steps), ``--out PATH``
(default ``gpu_check.md``), ``--sections a,b,c,d``, ``--budget SECONDS`` (default 420).
The report is rewritten after every section, so a timeout still leaves the finished ones.
A section that raises is recorded with its traceback and the others still run; the exit
status is 1 when any section raised or any check failed. Sections shrink their grids (largest
shapes last, skipped with a note) when the time budget runs short. Times are medians after
warm-up, taken with CUDA events on a GPU.

(a) The steering op on CUDA: graph body vs oracle parity inside CUDA-graph capture/replay
    and op time per layer vs a stand-in decoder layer (``benchmarks/gpu_op.py``).
(b) SAE training step of this project's TopK SAE (k=32, 8x and 32x, d_in 2048 and 4096,
    4096 tokens; bf16 autocast on CUDA, fp32 on CPU): encoder forward + backward, sparse
    decode, Adam, ``remove_parallel_grad``, ``normalize_decoder``; no dead latents, so no
    AuxK. FLOPs counted per step: ``6·B·d_in·d_sae`` for the dense encoder (forward, weight
    gradient, input gradient, which ``b_dec`` needs) plus ``6·B·d_in·k`` for the sparse
    decoder (gather-sum forward, row gradient, value gradient); TopK and Adam are not
    counted. Reported against the bf16 matmul rate measured in the same run (8192³ on a GPU).
(c) Encode (``SAE.encode_sparse``: pre-activation GEMM + TopK) in torch fp32 and bf16, and
    the exported ONNX encode graph in onnxruntime when a GPU execution provider is present
    (on CPU runs: the CPU provider at a small shape, checked against torch). FLOPs:
    ``2·B·d_in·d_sae``.
(d) ``resae train`` end to end as a subprocess on a tiny random Llama (hidden 128, 4 layers)
    with a locally made word-level tokenizer and a synthetic corpus, in a temporary cache:
    held-out FVE per layer, wall time, training tokens per wall second.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._report import (
    FAILED,
    Budget,
    Section,
    fmt,
    guarded,
    machine_header,
    matmul_tflops,
    median_seconds,
    write_report,
)

logger = logging.getLogger("benchmarks.gpu_check")
TITLES = {"a": "(a) Steering op on CUDA", "b": "(b) SAE training step throughput",
          "c": "(c) Encode throughput", "d": "(d) resae train end to end"}
WEIGHTS = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 2.0}
"""Shares of the time left that each section may use (of those still to run)."""
K = 32


class Run:
    """What every section needs: device, mode, budget and the reference matmul rates."""

    def __init__(self, device: torch.device, quick: bool, budget: Budget) -> None:
        self.device, self.quick, self.budget = device, quick, budget
        self.deadline = math.inf
        self.matmul_n = 8192 if self.cuda and not quick else 256
        self._rates: dict[str, float] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_sae) pairs, cheapest first."""
        d_ins = (64, 128) if self.quick else (2048, 4096)
        return sorted(((d, e * d) for d in d_ins for e in (8, 32)), key=lambda s: s[0] * s[1])

    def tokens(self) -> int:
        return 256 if self.quick else 4096

    def rate(self, dtype: str) -> float:
        """Measured ``n³`` matmul rate in ``bfloat16`` or ``float32``, TFLOP/s (cached)."""
        if dtype not in self._rates:
            n = self.matmul_n
            self._rates[dtype] = matmul_tflops(n, getattr(torch, dtype), self.device)
            logger.info("%s matmul %d³: %.3g TFLOP/s", dtype, n, self._rates[dtype])
        return self._rates[dtype]

    def rate_note(self) -> str:
        rates = ", ".join(f"{k} {fmt(v)} TFLOP/s" for k, v in sorted(self._rates.items()))
        tf32 = ", TF32 off" if "float32" in self._rates else ""
        return f"Reference: torch matmul {self.matmul_n}³ measured in this run: {rates}{tf32}."


def run_sized(run: Run, section: Section, shapes: list[tuple[int, int]],
              measure: Callable[[int, int], None]) -> None:
    """``measure(d_in, d_sae)`` for shapes in order, skipping the rest when running late.

    The time of the next shape is guessed from the last one, scaled by ``d_in · d_sae``.
    """
    last: tuple[float, int] | None = None
    for i, (d_in, d_sae) in enumerate(shapes):
        guess = 0.0 if last is None else last[0] * d_in * d_sae / last[1]
        if time.monotonic() + guess > run.deadline:
            skipped = ", ".join(f"{d}→{s}" for d, s in shapes[i:])
            section.notes.append(f"Skipped for the time budget: d_in→d_sae {skipped}.")
            logger.warning("%s: skipping %s (time budget)", section.title, skipped)
            return
        start = time.monotonic()
        measure(d_in, d_sae)
        last = (time.monotonic() - start, d_in * d_sae)
        if run.cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- (a)
def op_part(run: Run) -> Section:
    try:
        from benchmarks.gpu_op import op_section
    except ImportError as exc:
        if exc.name != "benchmarks.gpu_op":
            raise
        return Section(TITLES["a"], notes=[f"Not available: benchmarks/gpu_op.py ({exc})."])
    return op_section(run.device, run.quick)


# --------------------------------------------------------------------------- (b)
def train_part(run: Run) -> Section:
    from resae_serve.saes import SAEConfig, build_sae

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE fp32 here
    bf16 = run.rate("bfloat16")
    compute = "bf16 autocast" if run.cuda else "fp32"
    section = Section(TITLES["b"], ["d_in", "d_sae", "tokens", "compute", "step ms", "tokens/s",
                                    "TFLOP/s", "% of bf16 matmul"])
    batch = run.tokens()

    def measure(d_in: int, d_sae: int) -> None:
        sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=K), device=run.device)
        optimizer = torch.optim.Adam(sae.parameters(), lr=sae.config.effective_lr())
        u = torch.randn(batch, d_in, device=run.device)  # (B, d_in)
        dead = torch.zeros(d_sae, dtype=torch.bool, device=run.device)
        losses: list[torch.Tensor] = []

        def step() -> None:
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.cuda
                        else contextlib.nullcontext())
            with autocast:
                out = sae.training_step(u, dead)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_grad()
            optimizer.step()
            sae.normalize_decoder()
            losses.append(out.loss.detach())       # no host sync per step

        seconds = median_seconds(step, run.device, warmup=3, repeats=10)
        flops = 6 * batch * d_in * (d_sae + K)
        tflops = flops / seconds / 1e12
        section.rows.append([str(d_in), str(d_sae), str(batch), compute, fmt(seconds * 1e3),
                             fmt(batch / seconds), fmt(tflops), fmt(100 * tflops / bf16)])
        if not all(math.isfinite(float(x)) for x in losses):
            section.ok = False
            section.notes.append(f"Check failed: a non-finite loss at {d_in}→{d_sae}.")
        logger.info("train step %d→%d: %.3g ms", d_in, d_sae, seconds * 1e3)

    run_sized(run, section, run.shapes(), measure)
    section.notes += [
        f"One optimiser step of one TopK SAE (k={K}); FLOPs 6·B·d_in·(d_sae + k): dense "
        "encoder forward and both gradients, sparse decoder forward and both gradients; "
        "TopK, AuxK (no dead latents here) and Adam not counted.",
        run.rate_note()]
    return section


# --------------------------------------------------------------------------- (c)
def _export_package() -> Any:
    """``resae_serve.export`` when installed, else the source tree's top-level ``export``."""
    try:
        return importlib.import_module("resae_serve.export")
    except ModuleNotFoundError as exc:
        if exc.name != "resae_serve.export":
            raise
        return importlib.import_module("export")


def _gpu_provider() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    found = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return "cuda" if found else None


def encode_part(run: Run) -> Section:
    from resae_serve.saes import SAEConfig, build_sae

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE fp32 here
    bf16 = run.rate("bfloat16")
    run.rate("float32")
    section = Section(TITLES["c"], ["d_in", "d_sae", "tokens", "backend", "ms", "tokens/s",
                                    "TFLOP/s", "% of bf16 matmul"])
    batch = run.tokens()
    provider = "cpu" if not run.cuda else _gpu_provider()
    shapes = run.shapes()
    ort_shape = shapes[0]

    def row(d_in: int, d_sae: int, backend: str, seconds: float) -> None:
        tflops = 2 * batch * d_in * d_sae / seconds / 1e12
        section.rows.append([str(d_in), str(d_sae), str(batch), backend, fmt(seconds * 1e3),
                             fmt(batch / seconds), fmt(tflops), fmt(100 * tflops / bf16)])

    def measure(d_in: int, d_sae: int) -> None:
        sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=K), device=run.device).eval()
        x = torch.randn(batch, d_in, device=run.device)  # (B, d_in)
        with torch.no_grad():
            row(d_in, d_sae, "torch fp32", median_seconds(
                lambda: sae.encode_sparse(x), run.device))
            half = copy.deepcopy(sae).to(torch.bfloat16)
            x16 = x.to(torch.bfloat16)
            row(d_in, d_sae, "torch bf16", median_seconds(
                lambda: half.encode_sparse(x16), run.device))
            if provider is not None and (d_in, d_sae) == ort_shape:
                ort_rows(sae, x)

    def ort_rows(sae: Any, x: torch.Tensor) -> None:
        from resae_serve.resae import ReSAE

        export = _export_package()
        resae = ReSAE([0], [copy.deepcopy(sae).cpu()], [1.0], mode="layerwise")
        with tempfile.TemporaryDirectory(prefix="gpu_check_onnx.") as tmp:
            export.export_resae(resae, Path(tmp) / "onnx", export.ExportConfig(
                graphs=("encode",), reference_tokens=0))
            runtime = export.open_runtime(Path(tmp) / "onnx", export.RuntimeConfig(
                backend="onnxruntime", device=str(run.device), provider=provider))
            seconds = median_seconds(lambda: runtime.encode({0: x}), run.device)
            got = runtime.encode({0: x}).codes[0].values.float()
        want = sae.encode_sparse(x).values.float().sort(dim=-1, descending=True).values
        error = float((got - want).abs().max())
        allowed = 1e-4 + 1e-5 * float(want.abs().max())
        row(*ort_shape, f"onnxruntime {provider} fp32", seconds)
        section.notes.append(f"onnxruntime vs torch fp32 top-k values at {ort_shape[0]}→"
                             f"{ort_shape[1]}: max |diff| {error:.2g} (allowed {allowed:.2g}).")
        if not error <= allowed:
            section.ok = False
            section.notes.append("Check failed: onnxruntime encode differs from torch.")

    run_sized(run, section, shapes, measure)
    if provider is None:
        import_ok = importlib.util.find_spec("onnxruntime") is not None
        section.notes.append("onnxruntime rows skipped: " + (
            "onnxruntime has no CUDAExecutionProvider here" if import_ok
            else "onnxruntime is not installed") + ".")
    else:
        section.notes.append(f"onnxruntime: this project's exported encode graph (one layer, "
                             f"layerwise), provider {provider}, at the smallest shape only.")
    section.notes += ["Encode = `SAE.encode_sparse` (pre-activation GEMM + TopK, k=32); "
                      "FLOPs 2·B·d_in·d_sae.", run.rate_note()]
    return section


# --------------------------------------------------------------------------- (d)
N_WORDS = 300


def make_tiny_model(folder: Path) -> None:
    """A random Llama (hidden 128, 4 layers, head_dim 64) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(N_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=2)).save_pretrained(folder)


def write_corpus(path: Path, n_words: int) -> None:
    """A ``.jsonl`` corpus of 200-word documents of Zipf-distributed words."""
    generator = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, N_WORDS + 1)
    ids = torch.multinomial(weights, n_words, replacement=True, generator=generator)
    path.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in doc.tolist())}) + "\n"
                            for doc in ids.split(200)))


def train_cli(env: dict[str, str]) -> tuple[list[str], bool, str]:
    """The command that starts ``resae train``, whether it has ``--device``, and a note.

    Falls back to the train subcommand alone when ``python -m resae_serve`` cannot start
    (its parser imports every subcommand, some of which need packages absent here).
    """
    def helps(cli: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, "train", "--help"], env=env, capture_output=True,
                              text=True, timeout=300, check=False)

    cli, note = [sys.executable, "-m", "resae_serve"], ""
    shown = helps(cli)
    if shown.returncode != 0:
        reason = (shown.stderr.strip().splitlines() or ["no output"])[-1]
        cli = [sys.executable, "-c", "import sys, resae_serve.cli as c; "
               "c.SUBCOMMANDS = ('train',); sys.exit(c.main())"]
        note = (f"`python -m resae_serve train --help` failed here ({reason}); ran the train "
                "subcommand alone through `resae_serve.cli.main`.")
        shown = helps(cli)
        if shown.returncode != 0:
            raise RuntimeError(f"resae train --help failed:\n{shown.stderr[-2000:]}")
    return cli, "--device" in shown.stdout, note


def e2e_part(run: Run) -> Section:
    section = Section(TITLES["d"], ["layer", "held-out FVE", "input FVE", "L0", "dead"])
    late = not run.quick and run.deadline - time.monotonic() < 120
    calib, tokens, held = (4096, 16384, 2048) if run.quick else (16384, 131072, 16384)
    if late:
        tokens //= 4
        section.notes.append("Training tokens cut by 4 for the time budget.")
    context, batch = (64, 256) if run.quick else (256, 1024)
    with tempfile.TemporaryDirectory(prefix="gpu_check_train.") as tmp_name:
        tmp = Path(tmp_name)
        make_tiny_model(tmp / "model")
        write_corpus(tmp / "corpus.jsonl", 2 * (calib + tokens) + 20 * held)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "RESAE_CACHE": str(tmp / "cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        cli, has_device, note = train_cli(env)
        command = [*cli, "train", "--model", str(tmp / "model"), "--corpus",
                   str(tmp / "corpus.jsonl"), "--layers", "1,2", "--tokens", str(tokens),
                   "--calibration-tokens", str(calib), "--eval-tokens", str(held),
                   "--batch-size", str(batch), "--context-size", str(context), "--lr", "2e-3",
                   "--out", str(tmp / "dict")]
        if has_device:
            command += ["--device", str(run.device)]
        section.notes += [n for n in (note, "" if has_device else (
            "`resae train` has no `--device` flag yet: it ran on its default device.")) if n]
        if importlib.util.find_spec("matplotlib") is None:
            section.notes.append("matplotlib is not installed (resae train plots its curves).")
        logger.info("running %s", " ".join(command[2:] if cli[1] == "-m" else command[3:]))
        start = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                              timeout=max(run.deadline - start, 90.0))
        wall = time.monotonic() - start
        manifest = tmp / "dict" / "manifest.json"
        if done.returncode != 0 or not manifest.is_file():
            section.ok = False
            section.notes.append(f"Check failed: exit status {done.returncode}, manifest.json "
                                 f"{'present' if manifest.is_file() else 'missing'}.\n\n```\n"
                                 + "\n".join(done.stderr.splitlines()[-25:]) + "\n```")
            return section
        training = json.loads(manifest.read_text())["training"]
    for layer, m in training["eval"].items():
        section.rows.append([layer, fmt(m["fve"]), fmt(m["input_fve"]), fmt(m["l0"]),
                             f"{m['dead_fraction']:.1%}"])
        if not (math.isfinite(m["fve"]) and m["fve"] > 0):
            section.ok = False
            section.notes.append(f"Check failed: held-out FVE {m['fve']} at layer {layer}.")
    seen = training["tokens_seen"]
    section.notes.append(
        f"Wall {wall:.1f} s for {seen} training tokens ({training['steps']} steps of {batch}; "
        f"{calib} calibration and {held} held-out tokens, context {context}): "
        f"{fmt(seen / wall)} training tokens per wall second, start-up, capture, "
        "calibration and evaluation included. Model: random Llama, hidden 128, 4 layers, "
        f"vocabulary {N_WORDS + 4}; TopK 8x, k 32, lr 2e-3; layers 1,2.")
    return section


# --------------------------------------------------------------------------- driver
PARTS: dict[str, Callable[[Run], Section]] = {
    "a": op_part, "b": train_part, "c": encode_part, "d": e2e_part}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    parser.add_argument("--sections", default="a,b,c,d", help="comma-separated, of a,b,c,d")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds (default 420)")
    args = parser.parse_args(argv)
    keys = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not keys or any(k not in TITLES for k in keys):
        parser.error(f"--sections={args.sections!r}; allowed: any of a,b,c,d")
    args.keys = sorted(set(keys))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device={args.device!r}; allowed: auto, cpu, cuda, cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device={args.device} but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    run = Run(device, args.quick, Budget(args.budget))
    mode = (f"device {device}, {'quick' if args.quick else 'full'}, sections "
            f"{','.join(args.keys)}, budget {args.budget:.0f} s")
    header = machine_header("GPU check (benchmarks/gpu_check.py)", mode, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done: list[Section] = []
    for i, key in enumerate(args.keys):
        rest = args.keys[i:]
        write_report(args.out, header, done, "Still to run: " + ", ".join(
            TITLES[k] for k in rest) + ".\n")
        run.deadline = run.budget.deadline(WEIGHTS[key] / sum(WEIGHTS[k] for k in rest))
        logger.info("%s (%.0f s left of the budget)", TITLES[key], run.budget.left())
        done.append(guarded(TITLES[key], functools.partial(PARTS[key], run)))
        logger.info("%s: %s after %.1f s", TITLES[key], "ok" if done[-1].ok else FAILED,
                    run.budget.elapsed())
    ok = all(s.ok for s in done)
    write_report(args.out, header, done, f"\nTotal {run.budget.elapsed():.0f} s. " + (
        "All checks passed.\n" if ok else f"Some checks {FAILED}.\n"))
    logger.info("wrote %s", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
