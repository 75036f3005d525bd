"""Training on a device: settings, the same CPU result as before, no device in the settings."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from resae_serve.pipeline import DataConfig, activation_dtype
from resae_serve.train import (
    ReSAETrainer,
    TrainConfig,
    TrainError,
    rebatch,
    resolve_device,
    settings_diff,
)
from tests.unit.test_train import CONFIG, _stream, _trainer

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default")

# Checksums of the weights after the tiny runs below, recorded with the trainer as it was
# before training moved onto devices (dense encoder backward, plain Adam, W_enc = W_dec.T,
# i.e. encoder_init_scale=1): (Σ|θ|, Σ θ_i cos i) over every float tensor of the state dict
# in key order. Today's run with that initialisation differs only in float rounding (sparse
# TopK encoder backward, fused Adam: ~2e-7 of the largest weight), so they must agree to 1e-6
# of Σ|θ|.
GOLDEN: dict[tuple[str, int, int], tuple[float, float]] = {
    ("topk", 4, 4): (807.1287628905884, -6.894508716064752),
    ("topk", 32, 2): (6576.723107619284, -49.62276812516666),  # AuxK active (dead latents)
    ("batchtopk", 32, 2): (10493.45462210175, -34.71692720760491),
    ("relu", 4, 4): (804.757808237955, -7.671108629555009),
}
# The same runs with today's default encoder_init_scale (0.5), recorded when it was chosen.
GOLDEN_DEFAULT: dict[tuple[str, int, int], tuple[float, float]] = {
    ("topk", 4, 4): (689.0646012122215, -5.274111033873218),
    ("topk", 32, 2): (5063.409597308759, -37.432291430032066),
    ("batchtopk", 32, 2): (6862.36122481698, -23.019701205745815),
    ("relu", 4, 4): (601.8390488302684, -3.0966812320700265),
}


def _checksums(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    flat = torch.cat([t.double().flatten() for _, t in sorted(state.items())
                      if t.is_floating_point()])
    weights = torch.cos(torch.arange(len(flat), dtype=torch.float64))
    return float(flat.abs().sum()), float(flat @ weights)


def _run(config: TrainConfig) -> ReSAETrainer:
    trainer = _trainer(config)
    trainer.fit(rebatch(_stream(4000), config.batch_size), progress=False)
    return trainer


@pytest.mark.parametrize("init", ["before", "default"])
@pytest.mark.parametrize(("architecture", "expansion", "k"), list(GOLDEN))
def test_same_seed_gives_the_recorded_cpu_result(architecture: str, expansion: int, k: int,
                                                 init: str) -> None:
    config = dataclasses.replace(CONFIG, architecture=architecture, expansion=expansion, k=k,
                                 dead_after_tokens=400, device="cpu")
    if init == "before":
        config = dataclasses.replace(config, encoder_init_scale=1.0)
    trainer = _run(config)
    total, weighted = _checksums(trainer.resae.state_dict())
    golden = GOLDEN if init == "before" else GOLDEN_DEFAULT
    want_total, want_weighted = golden[(architecture, expansion, k)]
    assert math.isclose(total, want_total, rel_tol=1e-6)
    assert abs(weighted - want_weighted) <= 1e-6 * want_total
    if (architecture, expansion) == ("topk", 32):
        assert trainer.history[-1]["dead/5"] > 0  # AuxK had dead latents to work with


@cpu_only
def test_explicit_cpu_equals_the_default_on_a_cpu_host() -> None:
    default = _run(CONFIG)
    explicit = _run(dataclasses.replace(CONFIG, device="cpu"))
    assert CONFIG.device == "auto" and default.device == torch.device("cpu")
    for key, tensor in default.resae.state_dict().items():
        assert torch.equal(tensor, explicit.resae.state_dict()[key]), key
    assert default.history == explicit.history


def test_logging_only_every_log_every_steps_keeps_the_history() -> None:
    trainer = _run(CONFIG)
    assert [r["step"] for r in trainer.history] == list(range(1, 20, 2))
    assert set(trainer.history[0]) == {"step", "tokens", *(
        f"{m}/{layer}" for m in ("loss", "fve", "l0", "dead") for layer in (2, 5))}
    assert all(isinstance(v, (int, float)) for r in trainer.history for v in r.values())
    quiet = _trainer(CONFIG).train_step(next(rebatch(_stream(200), 200)), log=False)
    assert quiet == {"step": 0, "tokens": 200}


def test_bfloat16_activations_train_on_float32_parameters() -> None:
    trainer = _trainer(CONFIG)
    record = trainer.train_step(next(rebatch(_stream(200), 200)).bfloat16())
    assert all(p.dtype == torch.float32 for p in trainer.resae.parameters())
    assert math.isfinite(record["loss/5"])


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "device='gpu'; allowed: auto, cpu, cuda, cuda:N"),
    ("cuda:x", "device='cuda:x'; allowed"),
])
def test_bad_device_is_refused_by_name(device: str, message: str) -> None:
    with pytest.raises(TrainError, match=message.replace("(", r"\(")):
        dataclasses.replace(CONFIG, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_without_cuda_is_refused_clearly() -> None:
    config = dataclasses.replace(CONFIG, device="cuda")  # a valid setting ...
    with pytest.raises(TrainError, match="device='cuda' but CUDA is not available"):
        resolve_device(config.device)  # ... that this machine cannot honour
    with pytest.raises(TrainError, match="CUDA is not available"):
        _trainer(config)


def test_activation_dtype_defaults_by_device_and_refuses_unknown_names() -> None:
    assert activation_dtype("auto", torch.device("cpu")) == "float32"
    assert activation_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert activation_dtype("float16", torch.device("cpu")) == "float16"
    with pytest.raises(TrainError, match="dtype='int8'; allowed: auto, float32, bfloat16"):
        DataConfig(dtype="int8")


def test_device_and_auto_dtype_do_not_make_settings_differ() -> None:
    gpu_run = dataclasses.asdict(dataclasses.replace(CONFIG, device="cuda:1"))
    assert settings_diff(gpu_run, dataclasses.asdict(CONFIG), TrainConfig) == {}
    old = dataclasses.asdict(CONFIG)
    del old["device"]  # written before the field existed
    assert settings_diff(old, dataclasses.asdict(CONFIG), TrainConfig) == {}
    stored = dataclasses.asdict(DataConfig(dtype="bfloat16"))
    assert settings_diff(stored, dataclasses.asdict(DataConfig()), DataConfig) == {}
    assert settings_diff(stored, dataclasses.asdict(DataConfig(dtype="float32")),
                         DataConfig) == {"dtype": ("bfloat16", "float32")}
    other = dataclasses.asdict(dataclasses.replace(CONFIG, k=5))
    assert settings_diff(other, dataclasses.asdict(CONFIG), TrainConfig) == {"k": (5, 4)}


def test_runs_from_before_the_encoder_scale_count_as_scale_one() -> None:
    old = dataclasses.asdict(dataclasses.replace(CONFIG, encoder_init_scale=1.0))
    del old["encoder_init_scale"]
    assert settings_diff(old, dataclasses.asdict(CONFIG), TrainConfig) == {
        "encoder_init_scale": (1.0, 0.5)}
    with pytest.raises(TrainError, match="encoder_init_scale=0; must be a finite number > 0"):
        dataclasses.replace(CONFIG, encoder_init_scale=0)


def test_checkpoint_of_another_device_resumes(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    first = _trainer(CONFIG)
    first.fit(rebatch(_stream(2000), CONFIG.batch_size), checkpoint=checkpoint, progress=False)
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["device"] = "cuda"  # as if written by a GPU run
    torch.save(state, checkpoint)
    resumed = ReSAETrainer.load_checkpoint(checkpoint, dataclasses.replace(CONFIG, device="cpu"),
                                           _trainer(CONFIG).resae)
    assert resumed.tokens_seen == 2000


def test_progress_bar_shows_tokens_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _trainer(CONFIG)
    trainer.fit(rebatch(_stream(4000), CONFIG.batch_size), progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "fve=" in err


def test_train_cli_flags_reach_the_configs(tmp_path: Path) -> None:
    from resae_serve.cli import build_parser
    from resae_serve.cli.train import build_configs

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "d"), "--layers", "1,3",
                                      "--device", "cuda:1", "--dtype", "float16"])
    data, train = build_configs(args)
    assert (train.device, data.dtype) == ("cuda:1", "float16")
    data, train = build_configs(build_parser().parse_args(
        ["train", "--out", str(tmp_path / "d"), "--layers", "1,3"]))
    assert (train.device, data.dtype) == ("auto", "auto")
