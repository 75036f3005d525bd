"""Client SDK builders, ``resae client`` argument parsing and rendering (no server)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

from resae_serve.cli import main
from resae_serve.cli.client import parse_ints, parse_steer
from resae_serve.cli.render_client import (
    completion_table,
    dictionary_text,
    feature_detail,
    feature_list,
    search_hits,
    side_by_side,
    summary_line,
    token_table,
    watch_line,
    wrap,
)
from resae_serve.errors import ResaeError
from resae_serve.server import client as sdk
from resae_serve.server.client import Completion
from resae_serve.server.v1 import resae_pb2 as pb

# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize(("phase", "enum"), [("prompt", pb.PHASE_PROMPT),
                                             ("generation", pb.PHASE_GENERATION),
                                             ("all", pb.PHASE_ALL)])
def test_builders_map_phase(phase: str, enum: pb.Phase) -> None:
    for built in (sdk.add(6, 1, 2.0, phase), sdk.clamp(6, 1, 2.0, phase),
                  sdk.scale(6, 1, 2.0, phase), sdk.ablate(6, 1, phase),
                  sdk.vector(6, [0.5, -1.0], phase)):
        assert built.layer == 6 and built.phase == enum


def test_builders_set_mode_and_value() -> None:
    assert sdk.add(6, 11, 4.0) == pb.Intervention(
        layer=6, phase=pb.PHASE_ALL,
        feature=pb.FeatureEdit(feature=11, mode=pb.EDIT_MODE_ADD, value=4.0))
    assert sdk.clamp(1, 2, 3.0).feature.mode == pb.EDIT_MODE_CLAMP
    assert sdk.scale(1, 2, 0.5).feature.value == 0.5
    ablated = sdk.ablate(1, 2).feature
    assert ablated.mode == pb.EDIT_MODE_ABLATE and ablated.value == 0.0
    assert list(sdk.vector(3, (1.0, 2.0)).vector.values) == [1.0, 2.0]


def test_bad_phase_names_argument_and_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"phase='both'.*'prompt', 'generation', 'all'"):
        sdk.add(6, 1, 1.0, phase="both")
    with pytest.raises(ValueError, match="phase='PHASE_ALL'"):
        sdk.vector(6, [1.0], phase="PHASE_ALL")


def test_bad_mode_and_non_finite_values() -> None:
    with pytest.raises(ValueError, match=r"mode='boost'.*'add', 'clamp', 'scale', 'ablate'"):
        sdk.edit(6, 1, "boost", 1.0)
    with pytest.raises(ValueError, match="value=nan"):
        sdk.add(6, 1, math.nan)
    with pytest.raises(ValueError, match="must be finite"):
        sdk.vector(6, [1.0, math.inf])


def test_builders_gate_interventions_with_a_condition() -> None:
    gate = sdk.condition(6, 5, 2.5, sticky=True)
    assert gate == pb.Condition(layer=6, feature=5, value=2.5, sticky=True)
    for built in (sdk.add(12, 1, 2.0, when=gate), sdk.clamp(12, 1, 0.0, when=gate),
                  sdk.scale(12, 1, 0.5, when=gate), sdk.ablate(12, 1, when=gate),
                  sdk.vector(12, [1.0], when=gate)):
        assert built.when == gate
    assert not sdk.add(12, 1, 2.0).HasField("when")
    with pytest.raises(ValueError, match=r"when\.value=nan"):
        sdk.condition(6, 5, math.nan)


def test_monitor_builder() -> None:
    request = sdk.monitor([6, 12], top_k=3, watch=(5, 9), thresholds=[(6, 5, 2.5)])
    assert list(request.layers) == [6, 12] and request.top_k == 3
    assert list(request.watch) == [5, 9]
    assert request.thresholds[0] == pb.Threshold(layer=6, feature=5, value=2.5)


def test_input_needs_exactly_one_kind() -> None:
    assert sdk.make_input("hi").prompt == "hi"
    assert list(sdk.make_input(token_ids=[1, 2]).token_ids.ids) == [1, 2]
    chat = sdk.make_input(chat=[("system", "be brief"), {"role": "user", "content": "hi"}]).chat
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"),
                                                            ("user", "hi")]
    with pytest.raises(ValueError, match="got prompt, token_ids"):
        sdk.make_input("hi", token_ids=[1])
    with pytest.raises(ValueError, match="got none"):
        sdk.make_input()
    with pytest.raises(ValueError, match=r"chat\[0\] has keys \['role', 'text'\]"):
        sdk.make_input(chat=[{"role": "user", "text": "hi"}])


def test_generate_request_leaves_unset_sampling_unset() -> None:
    request = sdk.generate_request("hi", max_tokens=8, temperature=0.0, stop=["\n"],
                                   interventions=[sdk.add(6, 1, 1.0)])
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not request.sampling.HasField("top_p") and not request.sampling.HasField("seed")
    assert request.sampling.max_tokens == 8 and list(request.sampling.stop) == ["\n"]
    assert len(request.interventions) == 1 and not request.HasField("monitor")


def _stream() -> list[pb.GenerateResponse]:
    prompt = [pb.Token(position=0, id=1, text="The"), pb.Token(position=1, id=2, text=" cat")]
    return [
        pb.GenerateResponse(prompt=pb.PromptTokens(request_id="r7", tokens=prompt)),
        pb.GenerateResponse(chunk=pb.TokenChunk(
            tokens=[pb.Token(position=2, id=3, text=" sat")], text=" sat",
            features=[pb.TokenFeatures(position=0, layer=6,
                                       top=[pb.FeatureValue(feature=42, value=3.25)]),
                      pb.TokenFeatures(position=2, layer=6,
                                       top=[pb.FeatureValue(feature=7, value=1.5),
                                            pb.FeatureValue(feature=9, value=0.75)],
                                       watch=[0.125]),
                      pb.TokenFeatures(position=2, layer=12,
                                       top=[pb.FeatureValue(feature=100, value=2.0)])],
            events=[pb.FeatureEvent(position=2, layer=6, feature=7, value=1.5, threshold=1.0)])),
        pb.GenerateResponse(chunk=pb.TokenChunk(
            tokens=[pb.Token(position=3, id=4, text="\n")], text="\n")),
        pb.GenerateResponse(summary=pb.GenerateSummary(finish_reason="length", prompt_tokens=2,
                                                       completion_tokens=2, text=" sat\n")),
    ]


def test_completion_collects_a_stream() -> None:
    done = Completion.collect(_stream())
    assert done.request_id == "r7" and done.text == " sat\n"
    assert [t.text for t in done.prompt_tokens] == ["The", " cat"]
    assert [t.position for t in done.tokens] == [2, 3]
    assert len(done.features) == 3 and len(done.events) == 1
    assert done.summary is not None and done.summary.finish_reason == "length"


# ----------------------------------------------------------------------------- CLI parsing


@pytest.mark.parametrize(("spec", "expected"), [
    ("12:345:add:4", sdk.add(12, 345, 4.0)),
    ("6:7:clamp:-1.5:prompt", sdk.clamp(6, 7, -1.5, "prompt")),
    ("6:7:scale:0.5:generation", sdk.scale(6, 7, 0.5, "generation")),
    ("6:7:ablate", sdk.ablate(6, 7)),
    ("18:7:clamp:0@12:345>=4", sdk.clamp(18, 7, 0.0, when=sdk.condition(12, 345, 4.0))),
    ("18:7:ablate@12:345>=-0.5:sticky", sdk.ablate(18, 7, when=sdk.condition(12, 345, -0.5,
                                                                             sticky=True))),
    ("18:7:add:2:generation@6:1>=2.5:ood:sticky",
     sdk.add(18, 7, 2.0, "generation", when=sdk.condition(
         6, 1, 2.5, sticky=True, include_out_of_distribution=True))),
])
def test_parse_steer(spec: str, expected: pb.Intervention) -> None:
    assert parse_steer(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), [
    ("12:345", "expected LAYER:FEATURE:MODE:VALUE"),
    ("12:345:add", "expected LAYER:FEATURE:MODE:VALUE"),
    ("x:345:add:4", "must be integers"),
    ("12:345:add:lots", "VALUE a number"),
    ("12:345:boost:4", "mode='boost'"),
    ("12:345:add:4:later", "phase='later'"),
    ("12:345:add:nan", "must be finite"),
    ("12:345:add:4@6:7", "condition '6:7'; expected @LAYER:FEATURE>=VALUE"),
    ("12:345:add:4@6>=2", "condition '6>=2'; expected @LAYER:FEATURE>=VALUE"),
    ("12:345:add:4@6:x>=2", "LAYER and FEATURE must be integers"),
    ("12:345:add:4@6:7>=2:latch", "condition flag 'latch'; allowed: sticky, ood"),
    ("12:345:add:4@6:7>=inf", "when.value=inf; must be finite"),
])
def test_parse_steer_errors_name_flag_and_value(spec: str, reason: str) -> None:
    with pytest.raises(ResaeError) as info:
        parse_steer(spec)
    message = str(info.value)
    assert message.startswith(f"--steer {spec!r}:") and reason in message


def test_parse_ints() -> None:
    assert parse_ints("6,12") == [6, 12] and parse_ints("3") == [3]
    for bad in ("6,x", ",", ""):
        with pytest.raises(Exception, match="comma-separated integers"):
            parse_ints(bad)


def test_cli_parses_client_generate() -> None:
    from resae_serve.cli import build_parser

    args = build_parser().parse_args(
        ["client", "generate", "hi", "--steer", "6:1:add:2", "--steer", "6:2:ablate",
         "--monitor-layers", "6,12", "--watch", "5,9", "--watch", "11", "--compare",
         "--target", "example:1"])
    assert args.steer == ["6:1:add:2", "6:2:ablate"] and args.monitor_layers == [6, 12]
    assert args.watch == [5, 9, 11] and args.compare and args.target == "example:1"


def test_cli_parses_client_watch() -> None:
    from resae_serve.cli import build_parser

    args = build_parser().parse_args(["client", "watch", "--monitor", "tox", "--monitor", "pii",
                                      "--count", "3"])
    assert args.monitor == ["tox", "pii"] and args.count == 3
    assert build_parser().parse_args(["client", "watch"]).monitor == []


def test_cli_watch_help_and_steer_help_document_the_syntax(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["client", "watch", "--help"])
    assert "--monitor NAME" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["client", "generate", "--help"])
    assert "LAYER:FEATURE>=VALUE[:sticky][:ood]" in " ".join(capsys.readouterr().out.split())


def test_cli_grpc_error_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    status = main(["client", "features", "dictionary", "--target", f"127.0.0.1:{port}",
                   "--timeout", "10"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: UNAVAILABLE: ") and "Traceback" not in err


def test_cli_bad_steer_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "generate", "hi", "--steer", "6:1:boost:2"]) == 2
    assert "--steer '6:1:boost:2'" in capsys.readouterr().err


def test_cli_tls_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    assert main(["client", "features", "dictionary", "--tls-cert", str(cert)]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["client", "features", "dictionary", "--tls-ca", str(tmp_path / "no.pem")]) == 2
    assert f"--tls-ca {tmp_path / 'no.pem'}: no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("width", [30, 57, 80, 121])
def test_side_by_side_wraps_to_width(width: int) -> None:
    left = "the quick brown fox jumps over the lazy dog " * 6
    right = "a supercalifragilisticexpialidocious word\n\nand a second paragraph " * 3
    out = side_by_side(left, right, width, titles=("without steering", "with steering"))
    lines = out.splitlines()
    assert all(len(line) <= width for line in lines)
    assert lines[0].startswith("without") and "│ with" in lines[0]
    column = (width - 3) // 2
    assert all(line[column:column + 2] == " │" for line in lines)  # gutter lined up
    assert " ".join(out.split()).count("fox") == 6  # nothing dropped


def test_wrap_keeps_line_breaks() -> None:
    assert wrap("ab\n\ncd", 10) == ["ab", "", "cd"]
    assert wrap("", 10) == [""]
    assert all(len(line) <= 4 for line in wrap("abcdefghij", 4))


def test_token_table_lists_features_labels_watch_and_events() -> None:
    done = Completion.collect(_stream())
    table = completion_table(done, watch=[5], labels={(6, 7): "cats"})
    lines = table.splitlines()
    assert lines[0].split() == ["pos", "token", "layer", "top", "features"]
    row = next(line for line in lines if "' sat'" in line)
    assert "#7 1.50 (cats) · #9 0.75" in row and "watch #5=0.12" in row
    below = lines[lines.index(row) + 1]
    assert below.split()[:3] == ["12", "#100", "2.00"]  # next layer, same token
    assert "#42 3.25" in next(line for line in lines if "'The'" in line)
    assert "── generated ──" in lines[lines.index(row) - 1]
    assert "'\\n'" in table  # newline tokens stay visible
    assert lines[-1].strip() == "pos 2 ' sat' layer 6 feature 7: 1.50 >= 1.00"


def test_token_table_marks_out_of_distribution_positions() -> None:
    tokens = [pb.Token(position=p, id=p, text=t) for p, t in enumerate(["A", " the", " cat"])]
    features = [
        pb.TokenFeatures(position=0, layer=6, top=[pb.FeatureValue(feature=1, value=9.0)],
                         out_of_distribution=True,
                         out_of_distribution_reason=pb.OUT_OF_DISTRIBUTION_FIRST_POSITION),
        pb.TokenFeatures(position=1, layer=6, top=[pb.FeatureValue(feature=2, value=27.0)],
                         out_of_distribution=True,
                         out_of_distribution_reason=pb.OUT_OF_DISTRIBUTION_NORM_OUTLIER),
        pb.TokenFeatures(position=2, layer=6, top=[pb.FeatureValue(feature=3, value=1.0)])]
    lines = token_table(tokens, features).splitlines()[1:]
    assert lines[0].endswith("[out of distribution: first position]")
    assert lines[1].endswith("[out of distribution: norm outlier]")
    assert "out of distribution" not in lines[2]
    assert sdk.monitor([6], 1, include_out_of_distribution=True).include_out_of_distribution


def test_token_table_without_features() -> None:
    table = token_table([pb.Token(position=0, id=1, text="x" * 40)], [])
    assert table.splitlines()[1] == "    0  '" + "x" * 14 + "…"  # cut to TOKEN_WIDTH


def test_watch_lines() -> None:
    event = pb.WatchedEvent(request_id="resae-1", monitor="tox", action="stop", position=17,
                            token_id=9, token_text=" bad\n", layer=12, feature=345, value=4.25,
                            threshold=4.0, time_unix_s=1_700_000_000.125)
    assert watch_line(event) == ("2023-11-14T22:13:20.125Z  resae-1  tox (stop)  pos 17 "
                                 "' bad\\n'  layer 12 feature 345: 4.25 >= 4.00")
    assert watch_line(pb.EventsDropped(dropped=7, total=30)) == (
        "... 7 event(s) dropped: this reader fell behind (30 dropped in all)")


def test_summary_and_table_name_the_monitor() -> None:
    summary = pb.GenerateSummary(finish_reason="guardrail", prompt_tokens=3,
                                 completion_tokens=2, guardrail=pb.FeatureEvent(
                                     position=4, layer=3, feature=7, value=6.5, threshold=6.0,
                                     monitor="guard"))
    assert summary_line(summary).startswith("finish guardrail;")
    assert summary_line(summary).endswith("; stopped by monitor 'guard' at position 4 (layer 3 "
                                          "feature 7: 6.50 >= 6.00)")
    assert "stopped" not in summary_line(pb.GenerateSummary(finish_reason="stop"))
    table = token_table([pb.Token(position=4, id=1, text="x")], [], events=[
        pb.FeatureEvent(position=4, layer=3, feature=7, value=6.5, threshold=6.0,
                        monitor="guard")])
    assert table.splitlines()[-1].endswith("6.50 >= 6.00 (monitor guard)")


def test_catalog_rendering() -> None:
    feature = pb.Feature(layer=6, feature=7, label="cats", density=0.01, mean_activation=1.0,
                         max_activation=4.0, promoted=[" meow", " purr"],
                         suppressed=[" bark"],
                         contexts=[pb.FeatureContext(activation=3.5, text="the [[cat]] sat")])
    listed = feature_list([feature, pb.Feature(layer=6, feature=8)]).splitlines()
    assert len(listed) == 3 and "cats; promotes ' meow' ' purr'" in listed[1]
    detail = feature_detail(feature)
    assert "layer 6 feature 7: cats" in detail and "' bark'" in detail
    assert "3.50  'the [[cat]] sat'" in detail
    hits = search_hits([pb.SearchHit(feature=feature, score=12.5, mean_on_text=1.25,
                                     fires_on=[pb.FeatureValueOnToken(token=" cat", value=2)])],
                       "cat")
    assert "12.5" in hits and "' cat':2.00" in hits and "label: cats" in hits
    assert "no feature fired" in search_hits([], "cat")
    dictionary = dictionary_text(pb.GetDictionaryResponse(
        model="tiny", d_model=64, mode="resae",
        layers=[pb.DictionaryLayer(layer=6, d_sae=512, architecture="topk", k=16, scale=1.5,
                                   has_catalog=True)],
        limits=pb.RequestLimits(max_tokens=256)))
    assert "model tiny" in dictionary and "max_tokens 256" in dictionary
    assert dictionary.splitlines()[2].split() == ["6", "512", "topk", "16", "1.5", "yes"]
