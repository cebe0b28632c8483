"""`dualref study`: parsing, resumable scheduling, and the mean ± std report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from dualref.config import AdaptConfig, load_config
from dualref.data import synthetic
from dualref.pipelines import study


def _write(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload))
    return path


def _fake_run(run_dir: Path, epochs: int, maps: list[float], *, summary: bool = True) -> None:
    """A run folder as `dualref adapt` leaves it: config.yaml, eval records every epoch, summary.md."""
    _write(run_dir / "config.yaml", {"optim": {"epochs": epochs}})
    lines = [{"epoch": e, "kind": "adapt", "coarse_fscore": 0.1 * e} for e in range(1, len(maps) + 1)]
    lines += [
        {
            "epoch": e,
            "kind": "eval_target",
            "mAP": m,
            "rank1": m + 0.1,
            "rank5": 0.9,
            "rank10": 0.95,
            "mINP": 0.01,
        }
        for e, m in enumerate(maps, start=1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary:
        (run_dir / "summary.md").write_text("# done\n")
    else:
        (run_dir / "summary.md").unlink(missing_ok=True)


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    config = _write(tmp_path / "protocol.yaml", {"optim": {"epochs": 2}})
    return _write(
        tmp_path / "s.study.yaml",
        {
            "out": str(tmp_path / "out"),
            "plot": ["a", "b"],
            "compare": [["a", "b"], ["b", "a"]],
            "rows": [
                {"name": "a", "config": str(config), "seeds": [1, 2, 3]},
                {"name": "b", "config": str(config), "seeds": [1], "set": ["loss.spread_weight=0"]},
            ],
        },
    )


def test_runs_are_seed_major(study_file: Path) -> None:
    parsed = study.load_study(study_file)
    order = [(row.name, seed) for row, seed, _ in parsed.runs()]
    assert order == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert parsed.runs()[1][2] == parsed.out / "b" / "seed_1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown keys"),
        ({"parallel": 0}, "parallel=0"),
        ({"plot": ["c"]}, "not rows"),
        ({"compare": [["a", "c"]]}, r"compare=\[\['a', 'c'\]\]; expected a list of \[row, row\] pairs"),
        ({"compare": [["a"]]}, "expected a list of"),
        ({"rows": [{"name": "a", "config": "missing.yaml"}]}, "missing.yaml does not exist"),
        ({"rows": [{"name": "a", "config": "CONFIG", "seeds": []}]}, r"rows\[0\].seeds"),
        ({"rows": [{"name": "a", "config": "CONFIG", "set": ["novalue"]}]}, r"rows\[0\].set"),
        ({"rows": [{"name": "a", "config": "CONFIG"}, {"name": "a", "config": "CONFIG"}]}, "unique"),
    ],
)
def test_bad_study_files_name_the_key(study_file: Path, change: dict[str, object], message: str) -> None:
    raw = yaml.safe_load(study_file.read_text())
    config = raw["rows"][0]["config"]
    raw.pop("plot") if "rows" in change else None
    raw.update(yaml.safe_load(yaml.safe_dump(change).replace("CONFIG", config)))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        study.load_study(_write(study_file, raw))


def test_status_and_command_resume_partial_runs(study_file: Path) -> None:
    parsed = study.load_study(study_file)
    row, seed, run_dir = parsed.runs()[0]
    assert study.run_status(run_dir) == "new"
    command = study._command(row, seed, run_dir)
    assert command[3:5] == ["adapt", str(row.config)] and f"run.run_dir={run_dir}" in command
    _fake_run(run_dir, epochs=2, maps=[0.2], summary=False)  # stopped after epoch 1 of 2
    assert study.run_status(run_dir) == "partial"
    assert study._command(row, seed, run_dir)[3:] == ["adapt", "--resume", str(run_dir)]
    _fake_run(run_dir, epochs=2, maps=[0.2, 0.3], summary=False)
    assert study.run_status(run_dir) == "partial"  # evaluated, but the report was not written
    _fake_run(run_dir, epochs=2, maps=[0.2, 0.3])
    assert study.run_status(run_dir) == "done"


def test_report_gives_mean_and_std_of_the_last_epoch(study_file: Path) -> None:
    parsed = study.load_study(study_file)
    finals = {1: 0.30, 2: 0.34, 3: 0.41}
    for seed, last in finals.items():
        _fake_run(parsed.out / "a" / f"seed_{seed}", epochs=2, maps=[0.5, last])  # epoch 1 is best-on-test
    _fake_run(parsed.out / "b" / "seed_1", epochs=2, maps=[0.1])  # unfinished: left out
    assert study.run_study(study_file, report_only=True) == 0
    rows = json.loads((parsed.out / study.JSON_FILE).read_text())["rows"]
    a = next(r for r in rows if r["name"] == "a")
    assert a["seeds"] == 3
    assert a["mAP"] == pytest.approx([statistics.fmean(finals.values()), statistics.stdev(finals.values())])
    assert a["best_on_test_mAP"] == pytest.approx([0.5, 0.0])
    assert a["coarse_fscore"] == pytest.approx([0.2, 0.0])
    assert next(r for r in rows if r["name"] == "b")["seeds"] == 0
    text = (parsed.out / study.SUMMARY_FILE).read_text()
    assert "| a | 3/3 | 35.0 ± 5.6 |" in text
    # b has no finished seed: no difference yet.
    assert json.loads((parsed.out / study.JSON_FILE).read_text())["comparisons"] == []
    _fake_run(parsed.out / "b" / "seed_1", epochs=2, maps=[0.1, 0.2])
    assert study.run_study(study_file, report_only=True) == 0
    a_minus_b, b_minus_a = json.loads((parsed.out / study.JSON_FILE).read_text())["comparisons"]
    assert a_minus_b == {"rows": ["a", "b"], "seeds": [3, 1], "mAP": pytest.approx(0.15), "se": None}
    assert b_minus_a["mAP"] == pytest.approx(-0.15)
    text = (parsed.out / study.SUMMARY_FILE).read_text()
    assert "| a - b | 3 vs 1 | +15.0 |  |" in text
    # One seed has no spread: the mean alone, not a measured-looking "± 0.0".
    assert "| b | 1/1 | 20.0 | " in text
    b = next(r for r in json.loads((parsed.out / study.JSON_FILE).read_text())["rows"] if r["name"] == "b")
    assert b["mAP"] == [pytest.approx(0.2), None]
    assert (parsed.out / study.PLOT_FILE).stat().st_size > 1000


def test_difference_and_its_standard_error_by_hand() -> None:
    # Means 0.3 and 0.2; sample variances (0.01 + 0 + 0.01) / 2 = 0.01 and (0.0025 + 0.0025) / 1 = 0.005.
    diff, se = study.difference([0.2, 0.3, 0.4], [0.15, 0.25])
    assert diff == pytest.approx(0.1) and se == pytest.approx((0.01 / 3 + 0.005 / 2) ** 0.5)
    assert study.difference([0.5], [0.2, 0.3]) == (pytest.approx(0.25), None)


def test_a_tiny_study_runs_then_skips_what_finished(tmp_path: Path) -> None:
    target = synthetic.write_domain(tmp_path / "data", synthetic.domain_b_config(scale=0.1), seed=0)
    protocol = _write(
        tmp_path / "tiny.yaml",
        {
            "data": {"target": "market1501", "target_root": str(target), "height": 32, "width": 16,
                     "batch_size": 16, "num_workers": 0, "test_batch_size": 64},
            "model": {"arch": "tiny", "pretrained": None},
            "optim": {"epochs": 1, "iters_per_epoch": 2},
            "clustering": {"dbscan_rho": 0.05, "k1": 10},
        },
    )  # fmt: skip
    rows = [
        {
            "name": "baseline",
            "config": str(protocol),
            "set": ["loss.spread_weight=0", "loss.refined_weight=0"],
        }
    ]
    path = _write(tmp_path / "tiny.study.yaml", {"out": str(tmp_path / "out"), "parallel": 1, "rows": rows})
    assert study.run_study(path) == 0
    run_dir = tmp_path / "out" / "baseline" / "seed_1"
    assert study.run_status(run_dir) == "done"
    stamp = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    assert study.run_study(path) == 0  # nothing left to run
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert "| baseline | 1/1 |" in (tmp_path / "out" / study.SUMMARY_FILE).read_text()


def test_a_row_with_a_bad_key_stops_the_study_before_any_run(study_file: Path) -> None:
    raw = yaml.safe_load(study_file.read_text())
    raw["rows"][1]["set"] = ["loss.bank_decay=0"]  # not a key (loss.bank_weight_decay is)
    study_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"row 'b' \(seed 1\): unknown config key 'loss.bank_decay'"):
        study.run_study(study_file)
    assert not (Path(raw["out"]) / "a").exists()  # row a (first in order) was not started either


REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*REPO.glob("configs/**/*.study.yaml"), *REPO.glob("configs/**/*.search.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_study_files_load_with_every_row(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # row configs are named from the repository root
    parsed = study.load_study(path.relative_to(REPO))
    assert set(parsed.plot) <= {row.name for row in parsed.rows}
    for row in parsed.rows:
        for seed in row.seeds:
            cfg = load_config(AdaptConfig, str(row.config), [*row.overrides, f"run.seed={seed}"])
            assert cfg.run.seed == seed


def test_the_recipe_is_one_set_of_keys_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    # The search's choice, the study's recipe rows and configs/*/recipe.yaml (full.yaml plus the same keys).
    monkeypatch.chdir(REPO)
    recipe = {"clustering.max_cluster_share=0.01", "loss.triplet_feature=pooled", "optim.schedule=constant"}
    wanted = [
        ("duke_to_market.search.yaml", "cap_pooled_constant"),
        ("duke_to_market.study.yaml", "recipe"),
        ("market_to_duke.study.yaml", "recipe"),
    ]
    for name, row_name in wanted:
        (row,) = [r for r in study.load_study(f"configs/cpu/study/{name}").rows if r.name == row_name]
        assert set(row.overrides) - {"run.eval_every=0"} == recipe, name
    for direction in ("duke_to_market", "market_to_duke"):
        shipped = load_config(AdaptConfig, f"configs/{direction}/recipe.yaml")
        full_plus = [*sorted(recipe), f"run.run_dir=runs/{direction}/recipe"]
        assert shipped == load_config(AdaptConfig, f"configs/{direction}/full.yaml", full_plus), direction
