"""The reproduction's paired analysis and its report, on known data (no training).

The grid is the real one from ``hydra_configs/demo.yaml``; the runs are written by hand
as the runner would write them, for part of the grid, so the report must say how many
runs it rests on and compute the paired intervals a textbook gives.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import pytest

from longact.demo.pipeline import load_config
from longact.demo.reproduce import experiment_cfg, experiment_key, load_runs, main, plan, shard
from longact.demo.reproduce_report import analysis, write_report
from longact.eval.stats import paired, pooled_paired

T2 = 4.303  # two-sided 95% t, df 2 (printed tables)


def test_paired_interval_is_the_textbook_one():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, df 2
    iv = paired({1: 0.6, 2: 0.7, 3: 0.9}, {1: 0.5, 2: 0.5, 3: 0.6})
    assert iv.n == 3 and iv.mean == pytest.approx(0.2)
    assert iv.half == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-3)
    assert iv.verdict() == "tied"  # 0.2 - 0.248 < 0
    close = paired({1: 0.7, 2: 0.71, 3: 0.72}, {1: 0.5, 2: 0.5, 3: 0.5})  # sd 0.01
    assert close.verdict() == "better"
    assert paired({1: 0.5, 2: 0.5, 3: 0.5}, {1: 0.7, 2: 0.71, 3: 0.72}).verdict() == "worse"
    # only the seeds both arms have are paired
    assert paired({1: 0.5, 4: 0.9}, {1: 0.4, 2: 0.1}).n == 1


def test_pairing_removes_the_shared_seed_spread():
    # the seeds differ a lot, the arms by exactly 0.05 on every seed: an unpaired
    # interval would swallow the difference, the paired one is a point at 0.05
    ref = {1: 0.2, 2: 0.5, 3: 0.8}
    iv = paired({s: v + 0.05 for s, v in ref.items()}, ref)
    assert iv.mean == pytest.approx(0.05) and iv.half == pytest.approx(0.0, abs=1e-12)


def test_pooled_averages_each_seed_over_lengths_first():
    arm = {1: {384: 0.5, 512: 0.3}, 2: {384: 0.6, 512: 0.4}, 3: {384: 0.7, 512: 0.7}}
    ref = {1: {384: 0.4, 512: 0.2}, 2: {384: 0.4, 512: 0.2}, 3: {384: 0.5, 512: 0.3}}
    iv = pooled_paired(arm, ref, [384, 512])
    diffs = [0.1, 0.2, 0.3]  # per-seed means of (0.1, 0.1), (0.2, 0.2), (0.2, 0.4)
    assert iv.n == 3 and iv.mean == pytest.approx(sum(diffs) / 3)
    assert iv.half == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-3)
    assert pooled_paired(arm, {1: {384: 0.1}}, [384, 512]).n == 0  # a missing length


def _write_grid(tmp_path, bases, lift_of):
    """plain and topk runs of seeds 1-3: plain at ``bases[seed]`` (less 0.05 per longer
    length), topk ``lift_of(seed)`` above it."""
    cfg = experiment_cfg(load_config([]))
    key = experiment_key(cfg)
    runs = tmp_path / "reproduce" / "runs"
    runs.mkdir(parents=True)
    lengths = cfg["reproduce"]["eval"]["lengths"]
    for seed, base in bases.items():
        for arm, lift in (("plain", 0.0), ("topk", lift_of(seed))):
            acc = {t: {str(n): base + lift - 0.05 * i for i, n in enumerate(lengths)}
                   for t in cfg["reproduce"]["eval"]["tasks"]}  # fmt: skip
            rec = {
                "key": key, "run": f"grpo_{arm}_seed{seed}", "algo": "grpo", "arm": arm,
                "seed": seed, "accuracy": acc, "warmup_sha": "abc",
                "reward": {str(s): 0.05 * s + 0.01 * seed for s in range(1, 13)},
                "jaccard_first": {} if arm == "plain" else {"1": 1.0, "3": 0.8, "5": 0.7},
                "mass_kept": {} if arm == "plain" else {"1": 0.5, "3": 0.55, "5": 0.6},
            }  # fmt: skip
            # string keys sorted as strings (step "10" before "2"): order must not matter
            (runs / f"grpo_{arm}_seed{seed}.json").write_text(json.dumps(rec, sort_keys=True))
    old = {"key": "other", "run": "grpo_plain_seed9", "algo": "grpo", "arm": "plain", "seed": 9}
    (runs / "grpo_plain_seed9.json").write_text(json.dumps(old))
    warm = {t: {str(n): 0.9 - 0.1 * i for i, n in enumerate([64, 96, 128, 256, 384, 512])}
            for t in cfg["reproduce"]["eval"]["tasks"]}  # fmt: skip
    (runs / "warmup.json").write_text(json.dumps({"key": key, "accuracy": warm}))
    return cfg, key, tmp_path


@pytest.fixture
def grid(tmp_path):
    return _write_grid(tmp_path, {1: 0.3, 2: 0.5, 3: 0.4}, lambda seed: 0.1 * seed / 3)


def test_report_from_a_partial_grid(grid):
    cfg, key, root = grid
    results = root / "reproduce"
    current, stale = load_runs(results, key)
    assert len(current) == 6 and stale == ["grpo_plain_seed9"]
    report = write_report(cfg, results, root / "reproduce.md", key, plan(cfg))
    text = report.read_text()
    assert f"from **6 of {len(plan(cfg))} planned runs**" in text
    assert "another experiment key, left out: grpo_plain_seed9" in text
    # topk - plain per seed: 0.1/3, 0.2/3, 0.3/3 at every length: mean 0.0667
    res = analysis(cfg, current, plan(cfg))
    e = res[("grpo", "topk", "niah_single")]
    assert e["seeds"] == [1, 2, 3] and e["pooled"].n == 3
    assert e["pooled"].mean == pytest.approx(0.2 / 3)
    assert e["pooled"].half == pytest.approx(T2 * (0.1 / 3) / math.sqrt(3), rel=1e-3)
    assert "+0.067 ± 0.083 (n=3)" in text and "| tied |" in text
    for png in ("accuracy_vs_length", "paired_differences", "reward_per_step", "mask_drift"):
        assert (results / f"{png}.png").stat().st_size > 5000, png
        assert f"reproduce/{png}.png" in text
    assert "## Paper scale (not run here)" in text
    assert "128: 0.70" in text  # the warm-up's accuracy at its longest length
    # each figure's sentence is written from its numbers: at 512, plain is 0.15 below
    # each seed's base (mean 0.25) and topk adds 0.1 * seed / 3 on average (0.32)
    assert "runs from 0.25 (GRPO plain) to 0.32 (GRPO topk) (warm-up: 0.40)" in text
    assert "2 of 2 pooled intervals (red) include zero; the widest is ±0.083" in text
    # steps 8-12 (not "5"-"9", the last keys in string order): 0.5 + 0.01 * mean seed
    assert "over the last 5 steps it averages 0.52" in text
    assert "at the last refresh: GRPO topk 0.70." in text
    assert "near its floor" not in text and "no spread" not in text
    # what the method arm's interval rules out: +6.7 ± 8.3 points holds the paper's +3.9
    assert "### What this can and cannot say" in text
    assert "lies in [-1.6, +14.9] points (n=3): a gain above +14.9 or a loss below -1.6" in text
    assert "+3.9 points on LongBench v2 lies inside" in text


def test_report_explains_no_interval_and_a_task_at_its_floor(tmp_path):
    # accuracies 0.1 and below, topk exactly 1/128 above plain on every seed
    cfg, key, root = _write_grid(tmp_path, {1: 0.1, 2: 0.08, 3: 0.09}, lambda seed: 1 / 128)
    text = write_report(cfg, root / "reproduce", root / "r.md", key, plan(cfg)).read_text()
    assert "+0.008 ± n/a (n=3): n/a" in text
    assert "every seed gave the same nonzero difference (accuracy moves in steps of 1/128)" in text
    assert "`niah_single` stays near its floor in every arm (best mean accuracy 0.10)" in text
    assert "No arm beats plain RL" in text
    assert "What this can and cannot say" not in text  # no interval: nothing to rule out


def test_report_with_no_runs_says_so(tmp_path):
    cfg = experiment_cfg(load_config([]))
    text = write_report(cfg, tmp_path / "r", tmp_path / "r.md", experiment_key(cfg), plan(cfg))
    text = text.read_text()
    assert f"from **0 of {len(plan(cfg))} planned runs**" in text and "No run has finished" in text


def test_the_grid_has_the_seeds_the_analysis_needs():
    runs = plan(experiment_cfg(load_config([])))
    count = {}
    for r in runs:
        count[(r.algo, r.arm)] = count.get((r.algo, r.arm), 0) + 1
    assert count[("grpo", "topk")] >= 6 and count[("grpo", "plain")] >= 6
    assert all(n >= 3 for n in count.values()) and len(count) == 7
    assert runs[0].seed == 1 and runs[-1].seed == 6  # seed by seed: pairs complete early


def _ignored(repo: Path, rel: str) -> bool:
    """Whether git would ignore the file ``rel`` under the ``.gitignore`` files of ``repo``
    (read from the tree: no git, no ``.git`` needed). As in gitignore(5): a file inside an
    ignored folder is ignored, deeper files override outer ones, the last match decides.
    Patterns: comments, ``!``, a trailing ``/`` (folders), ``/`` anchoring, globs, ``**``."""
    parts = rel.split("/")
    for depth in range(1, len(parts) + 1):  # each folder on the way, then the file
        verdict = False
        for base in range(depth):
            rules = repo.joinpath(*parts[:base], ".gitignore")
            lines = rules.read_text().splitlines() if rules.is_file() else []
            for line in lines:
                line = line.rstrip()
                if not line or line.startswith("#"):
                    continue
                negate, pattern = line.startswith("!"), line.lstrip("!")
                if pattern.endswith("/") and depth == len(parts):
                    continue  # a folder pattern; this is the file
                pattern = pattern.rstrip("/")
                here = parts[base:depth] if "/" in pattern else parts[depth - 1 : depth]
                if _glob(pattern.lstrip("/").split("/"), here):
                    verdict = not negate
        if verdict:
            return True
    return False


def _glob(pattern: list[str], path: list[str]) -> bool:
    """Path segments against pattern segments (``**`` spans any number of segments)."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_glob(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _glob(pattern[1:], path[1:])


def test_run_results_are_not_ignored_by_git():
    """docs/reproduce/runs/*.json must be committable (a `runs/` ignore rule once hid them),
    while the top-level runs/ stays ignored; checked from the tree's .gitignore files, so
    it runs the same in a checkout, a tarball or an image."""
    repo = Path(__file__).resolve().parents[2]
    assert (repo / ".gitignore").is_file(), f"no .gitignore in {repo}"
    probe = "docs/reproduce/runs/grpo_topk_seed1.json"
    assert not _ignored(repo, probe), f"{probe} is ignored by a .gitignore rule"
    assert _ignored(repo, "runs/demo/report.md"), "the top-level runs/ is not ignored"
    assert _ignored(repo, "longact/__pycache__/x.pyc")  # the reading of .gitignore works


def test_shards_split_the_plan_without_overlap():
    runs = plan(experiment_cfg(load_config([])))
    parts = [shard(runs, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(r.name for p in parts for r in p) == sorted(r.name for r in runs)
    assert len({r.name for p in parts for r in p}) == len(runs)
    assert shard(runs, "1/1") == runs and parts[1][0] == runs[1]
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="expected K/N"):
            shard(runs, bad)


def test_bad_shard_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--shard", "4/3", "--report-only"])
    assert e.value.code == 2 and "--shard '4/3': expected K/N" in capsys.readouterr().err
