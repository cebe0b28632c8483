"""Ranked lists: the pure `ranked_list` against the protocol, and `dualref visualize` (tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualref import cli, evaluation, visualize
from tiny_model import write_checkpoint, write_target

# gallery index:   g0  g1  g2  g3  g4  g5
G_PIDS = np.array([1, 1, 2, 0, 1, 3])
G_CAMS = np.array([0, 1, 0, 1, 2, 0])
# Query pid 1 on camera 0. Ranked: g0 .10 (pid 1 cam 0: junk), g2 .20, g3 .30, g1 .40 (match), g5 .45,
# g4 .50 (match). Scored ranks: g2 1, g3 2, g1 3, g5 4, g4 5.
DIST = np.array([0.10, 0.40, 0.20, 0.30, 0.50, 0.45])


def test_ranked_list_marks_ranks_and_ap_follow_the_protocol() -> None:
    ranked = visualize.ranked_list(DIST, 1, 0, G_PIDS, G_CAMS, top_k=3, query=4)
    assert ranked.query == 4
    assert ranked.gallery.tolist() == [0, 2, 3, 1]  # the junk entry ranked among the top 3 is kept, marked
    assert ranked.marks == [visualize.JUNK, visualize.WRONG, visualize.WRONG, visualize.CORRECT]
    assert ranked.ranks.tolist() == [0, 1, 2, 3]
    assert ranked.dist.tolist() == pytest.approx([0.10, 0.20, 0.30, 0.40])
    assert ranked.average_precision == pytest.approx((1 / 3 + 2 / 5) / 2)
    protocol = evaluation.rank_metrics(DIST[None], [1], G_PIDS, [0], G_CAMS)
    assert ranked.average_precision == pytest.approx(protocol.mAP)
    # A junk entry after the k-th scored entry is not shown; no true match gives no AP.
    assert visualize.ranked_list(DIST[::-1].copy(), 1, 0, G_PIDS, G_CAMS, top_k=1).marks == [visualize.WRONG]
    assert visualize.ranked_list(DIST, 3, 0, G_PIDS, G_CAMS, top_k=2).average_precision is None


def test_random_queries_are_seeded_and_have_a_true_match() -> None:
    q_pids, q_cams = np.array([1, 3, 2, 1, 9]), np.array([0, 0, 1, 2, 0])
    valid = visualize.valid_queries(q_pids, q_cams, G_PIDS, G_CAMS)
    assert valid.tolist() == [True, False, True, True, False]  # pid 3 only on camera 0; pid 9 absent
    chosen = visualize.choose_queries(valid, 2, seed=5)
    assert chosen.tolist() == visualize.choose_queries(valid, 2, seed=5).tolist()
    assert set(chosen.tolist()) <= {0, 2, 3} and len(chosen) == 2
    assert visualize.choose_queries(valid, 10, seed=0).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="no query has a true match"):
        visualize.choose_queries(np.zeros(3, dtype=bool), 2, seed=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("visualize")
    before = write_checkpoint(folder / "before.pt", seed=0, kind="pretrain", epoch=3)
    after = write_checkpoint(folder / "after.pt", seed=1, kind="adapt", epoch=2)
    return write_target(folder / "data"), before, after


def test_visualize_compare_writes_pngs_and_index(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, before, after = pair
    out = tmp_path / "ranked"
    argv = ["visualize", str(before), "--dataset", "market1501", "--root", str(root), "--compare", str(after)]
    argv += ["--queries", "3", "--top-k", "5", "--workers", "0", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "direct transfer, epoch 3" in printed and "adapted, epoch 2" in printed and "mAP" in printed
    pngs = sorted(out.glob("query_*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as image:
        width, height = image.size
    assert width > 600 and height > 450  # two rows of 1 + >= 5 cells
    page = (out / visualize.INDEX_FILE).read_text()
    assert page.count("<img src=") == 3 and all(p.name in page for p in pngs)
    assert "direct transfer" in page and "adapted" in page
    # The same seed draws the same queries.
    again = tmp_path / "again"
    assert cli.main([*argv, "--out", str(again)]) == 0
    assert [p.name for p in sorted(again.glob("query_*.png"))] == [p.name for p in pngs]


def test_visualize_chosen_queries_from_saved_distances(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, before, _ = pair
    saved = tmp_path / "saved"
    argv = ["evaluate", str(before), "--dataset", "market1501", "--root", str(root), "--workers", "0"]
    assert cli.main([*argv, "--save-features", str(saved)]) == 0
    out = tmp_path / "ranked"
    argv = ["visualize", "--saved", str(saved), "--query-index", "0", "--query-index", "7", "--out", str(out)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["query_00000.png", "query_00007.png"]
    capsys.readouterr()
    assert cli.main([*argv[:3], "--query-index", "999", "--out", str(out)]) == 2
    assert "--query-index [999]: expected 0..29" in capsys.readouterr().err
    assert cli.main(["visualize", "--saved", str(tmp_path), "--out", str(out)]) == 2
    assert "lacks dist.npy" in capsys.readouterr().err
