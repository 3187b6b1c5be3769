"""``longact tiny-model``: argument errors exit 2 with one clear line; reruns are no-ops."""

from __future__ import annotations

from longact.cli.main import main


def test_unknown_size_exit_2_lists_valid_sizes(tmp_path, capsys):
    rc = main(["tiny-model", "--out", str(tmp_path / "m"), "--size", "huge"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'huge'" in err
    assert "s, xs, xxs" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_non_empty_dir_without_force_is_an_error(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = main(["tiny-model", "--out", str(out), "--size", "xxs"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(out) in err and "not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_write_then_rerun_is_a_no_op_and_force_rebuilds(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["tiny-model", "--out", str(out), "--size", "xxs", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    weights = out / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())

    assert main(["tiny-model", "--out", str(out), "--size", "xxs", "--seed", "3"]) == 0
    assert "already holds a tiny model" in capsys.readouterr().out
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before

    assert main(["tiny-model", "--out", str(out), "--size", "xxs", "--seed", "4", "--force"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert weights.read_bytes() != before[1]


def test_arch_writes_that_family_and_unknown_arch_lists_valid(tmp_path, capsys):
    import json

    out = tmp_path / "phi"
    assert main(["tiny-model", "--out", str(out), "--size", "xxs", "--arch", "phi3"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3"
    assert json.loads((out / "longact_tiny.json").read_text())["arch"] == "phi3"
    capsys.readouterr()
    rc = main(["tiny-model", "--out", str(out), "--size", "xxs", "--arch", "olmo2"])
    assert rc == 2 and "holds a tiny phi3 model" in capsys.readouterr().err
    rc = main(["tiny-model", "--out", str(tmp_path / "x"), "--arch", "mamba"])
    err = capsys.readouterr().err
    assert rc == 2 and "'mamba'" in err and "gemma4" in err and "qwen3_5" in err
