"""``longact doctor OVERRIDES``: a run checked before it starts, without Ray."""

from __future__ import annotations

import shutil

import pytest

from longact.cli.main import main


@pytest.fixture(scope="module")
def run_files(tiny_xxs, tmp_path_factory):
    from longact.data.tasks import make_dataset, write_parquet

    out = tmp_path_factory.mktemp("doctor")
    model = shutil.copytree(tiny_xxs, out / "model")
    # unreadable weights: doctor checks the model's config, and loading it would fail here
    (model / "model.safetensors").write_bytes(b"not safetensors")
    rows = make_dataset("niah_single", tiny_xxs, length=96, n=6, seed=0)
    data = write_parquet(rows, out / "train.parquet")
    bad = out / "notes.parquet"
    bad.write_text("not parquet")
    return {"model": model, "data": data, "bad": bad}


def _args(f, *extra):
    return [
        "doctor",
        "recipe=dapo_cpu",
        f"actor_rollout_ref.model.path={f['model']}",
        f"data.train_files={f['data']}",
        f"data.val_files={f['data']}",
        *extra,
    ]


def test_dapo_recipe_is_quiet_once_longact_bounds_sampling(run_files, capsys, monkeypatch):
    """The run is composed and checked without starting it: no Ray, no verl trainer, no
    model weights loaded (they are unreadable here); a hang is the timeout's to catch."""
    import ray

    import longact.train.entry as entry

    def forbidden(what: str):
        def call(*args, **kwargs):
            raise AssertionError(f"longact doctor {what}")

        return call

    monkeypatch.setattr(ray, "init", forbidden("started Ray"))
    monkeypatch.setattr(entry, "run", forbidden("started verl's trainer"))
    assert main(_args(run_files)) == 0
    out = capsys.readouterr().out
    for line in (
        "recipe     dapo_cpu",
        "verl v1 (sync), device=cpu, 1 node(s) x 2 rank(s)",
        "rollout    hf, n=8",
        "DAPO filter on 'acc', at most 16 rounds/step (enforced by LongAct)",
        "longact    on: ratio=0.3 policy=topk",
        "LongAct adapter 'qwen3'",
        "(6 rows)",
        "no ignored settings, no problems found",
    ):
        assert line in out, (line, out)
    assert "max_num_gen_batches" not in out.split("algorithm")[0]
    assert "no effect" not in out


def test_flags_max_num_gen_batches_where_longact_does_not_enforce_it(run_files, capsys):
    args = _args(
        run_files,
        "trainer.v1.sampler.custom_sampler.path=/elsewhere/mine.py",
        "trainer.v1.sampler.custom_sampler.name=Mine",
    )
    assert main(args) == 0  # a warning, not a problem
    out = capsys.readouterr().out
    assert (
        "no effect  algorithm.filter_groups.max_num_gen_batches=16: ignored by verl's v1 "
        "trainer (a custom sampler is configured)"
    ) in out, out


def test_keys_without_effect(run_files, capsys):
    assert main(_args(run_files, "longact.enable=false", "longact.ratio=0.2")) == 0
    out = capsys.readouterr().out
    assert "no effect  longact.ratio: longact.enable=false (plain RL)" in out, out
    assert main(_args(run_files, "longact.seed=3")) == 0
    assert "longact.seed=3: only the `random` policy draws" in capsys.readouterr().out


def test_unreadable_inputs_are_problems(run_files, tmp_path, capsys):
    args = _args(run_files, f"data.val_files={run_files['bad']}", "longact.ratio=1.5")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM    data.val_files: cannot read {run_files['bad']} as parquet" in out
    assert "PROBLEM    longact.ratio=1.5 is outside (0, 1]" in out, out
    assert main(_args(run_files, f"actor_rollout_ref.model.path={tmp_path / 'none'}")) == 1
    assert "does not exist" in capsys.readouterr().out


def test_names_the_rollout_engine_and_refuses_vllm_for_a_16_wide_head(run_files, capsys):
    """The rollout line says what runs and whether it is installed; the xxs model's
    head_dim 16 is below what vLLM's CPU attention serves, so vllm is a problem."""
    assert main(_args(run_files, "actor_rollout_ref.rollout.name=vllm")) == 1
    out = capsys.readouterr().out
    assert "rollout    vllm, n=8, tensor parallel 1: verl's vLLM server on PyPI's CPU build" in out
    assert "PROBLEM    " in out and "has head_dim 16; vLLM's CPU attention serves" in out
    assert main(_args(run_files)) == 0
    assert "transformers.generate in a Ray actor (LongAct's hf rollout)" in capsys.readouterr().out


def test_lora_run_shows_what_longact_trains_per_projection(run_files, capsys):
    """``longact doctor`` on a LoRA run: the rows of lora_B the masks keep, the rank and
    the parameters, per projection (the xxs model: 2 layers, q 4 x 16 = 64 rows, k 2 x 16
    = 32, ratio 0.3)."""
    lora = ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16"]
    assert main(_args(run_files, *lora)) == 0
    out = capsys.readouterr().out
    assert "lora       rank 8, alpha 16, target_modules all-linear, synced to the rollout" in out
    q = next(ln for ln in out.splitlines() if ln.strip().startswith("q "))
    k = next(ln for ln in out.splitlines() if ln.strip().startswith("k "))
    # n_keep(0.3, 64) = 19 rows per layer, x 2 layers; params = rows x rank
    assert "38 / 128" in q and "304 / 1,024" in q and "q_proj" in q
    assert "20 / 64" in k and "160 / 512" in k  # n_keep(0.3, 32) = 10 per layer
    assert q.endswith("1,024")  # lora_A: 2 layers x rank 8 x hidden 64
    bad = [*lora, "actor_rollout_ref.model.target_modules=[v_proj]"]
    assert main(_args(run_files, *bad)) == 1
    assert "PROBLEM    actor_rollout_ref.model.target_modules=['v_proj'] leaves q_proj" in (
        capsys.readouterr().out
    )
