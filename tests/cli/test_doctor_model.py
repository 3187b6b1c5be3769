"""``longact doctor --model DIR``: what LongAct would do, from config.json alone."""

from __future__ import annotations

import json

import pytest

from longact.cli.main import main
from longact.models.tiny import SIZES
from longact.models.tiny_arch import tiny_config


def _write(tmp_path, arch: str, **over):
    out = tmp_path / arch
    out.mkdir()
    tiny_config(arch, SIZES.get("xxs"), 64, **over).save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # no weights needed
    return str(out)


def test_hybrid_qwen3_5_layers_rows_and_gate(tmp_path, capsys):
    model = _write(tmp_path, "qwen3_5", num_hidden_layers=4)
    assert main(["doctor", "--model", model]) == 0
    out = capsys.readouterr().out
    assert "qwen3.5 adapter" in out and "applies to 2 of 4 decoder layers" in out
    assert "skipped (no Q/K): 0,2" in out
    assert "q_proj h*32 + [0, 16) per head" in out  # query rows; the gate rows are not W_Q
    assert "first 4 of 16 rotated" in out  # partial rotary 0.25
    assert "capture point norm: q_norm / k_norm output (B, T, H, D)" in out


def test_ratio_and_fused_phi3(tmp_path, capsys):
    model = _write(tmp_path, "phi3")
    assert main(["doctor", "--model", model, "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "ratio 0.5" in out
    assert "qkv_proj [0, 64)" in out and "qkv_proj [64, 96)" in out
    q_line = next(line for line in out.splitlines() if "qkv_proj [0, 64)" in line)
    assert " 32 " in q_line  # 0.5 of 64 rows
    assert "capture point norm: not available" in out


def test_smollm3_nope_and_gemma4_shared(tmp_path, capsys):
    assert main(["doctor", "--model", _write(tmp_path, "smollm3")]) == 0
    assert "no RoPE (rope_pair = channel)" in capsys.readouterr().out
    assert main(["doctor", "--model", _write(tmp_path, "gemma4", num_hidden_layers=4)]) == 0
    out = capsys.readouterr().out
    assert "none: no W_K here" in out and "pairs at frequency 0" in out


def test_unsupported_and_bad_input(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert main(["doctor", "--model", str(ds)]) == 1
    err = capsys.readouterr().err
    assert "does not support model_type 'deepseek_v3'" in err and "Supported: " in err
    assert main(["doctor", "--model", str(tmp_path / "missing")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    model = _write(tmp_path, "llama")
    assert main(["doctor", "--model", model, "--ratio", "0"]) == 2
    assert "--ratio: mask ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["doctor", "--model", model, "recipe=dapo_cpu"]) == 2


@pytest.mark.parametrize("arch", ["qwen3", "gpt_oss", "olmo2", "glm4_moe", "gemma3"])
def test_every_family_reports(tmp_path, capsys, arch):
    assert main(["doctor", "--model", _write(tmp_path, arch)]) == 0
    assert "W_Q/W_K rows in all:" in capsys.readouterr().out
