"""Parsers on empty files named like each data set's, and the real data counts when present."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import shared_dataset
from dualref.data import datasets
from dualref.data.records import ReidSplits, num_cameras, num_pids, relabel_pids


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def triples(samples: list) -> list[tuple[str, int, int]]:
    return [(s.path.name, s.pid, s.camid) for s in samples]


@pytest.fixture
def market(tmp_path: Path) -> Path:
    root = tmp_path / "Market-1501-v15.09.15"
    touch(root / "bounding_box_train", "0002_c1s1_000451_03.jpg", "0002_c6s1_000476_01.jpg",
          "0007_c2s3_070952_01.jpg", "-1_c3s1_000001_00.jpg", "Thumbs.db")
    touch(root / "query", "0002_c2s1_000301_00.jpg", "0007_c5s1_000001_00.jpg")
    touch(root / "bounding_box_test", "-1_c1s1_000401_03.jpg", "-1_c2s1_000451_04.jpg",
          "0000_c1s1_000151_01.jpg", "0002_c3s1_000551_01.jpg", "0007_c4s2_000001_01.jpg")
    return root


def test_market_parses_pids_cameras_junk_and_distractors(market: Path) -> None:
    report = datasets.load_dataset_report("market1501", market)
    splits = report.splits
    # Sorted by path ("0002_c1" < "0002_c6" < "0007"); cameras c1..c6 -> 0..5; junk -1 dropped.
    assert triples(splits.train) == [
        ("0002_c1s1_000451_03.jpg", 2, 0),
        ("0002_c6s1_000476_01.jpg", 2, 5),
        ("0007_c2s3_070952_01.jpg", 7, 1),
    ]
    assert triples(splits.query) == [("0002_c2s1_000301_00.jpg", 2, 1), ("0007_c5s1_000001_00.jpg", 7, 4)]
    # Distractor pid 0 kept in the gallery; both junk images dropped and counted.
    assert triples(splits.gallery) == [
        ("0000_c1s1_000151_01.jpg", 0, 0),
        ("0002_c3s1_000551_01.jpg", 2, 2),
        ("0007_c4s2_000001_01.jpg", 7, 3),
    ]
    assert report.num_junk == {"train": 1, "query": 0, "gallery": 2}
    assert report.problems == []
    assert all(s.path.is_absolute() and s.path.exists() for s in splits.train)
    # Training pids stay raw; relabel_pids gives 0..K-1.
    assert relabel_pids(splits.train) == [0, 0, 1]


@pytest.mark.parametrize(
    "parent_layout",
    ["Market-1501-v15.09.15", "Market-1501", "market1501", "market1501/Market-1501-v15.09.15"],
)
def test_market_root_may_be_a_parent_holding_the_usual_name(tmp_path: Path, parent_layout: str) -> None:
    root = tmp_path / parent_layout
    touch(root / "bounding_box_train", "0002_c1s1_000451_03.jpg")
    touch(root / "query", "0002_c2s1_000301_00.jpg")
    touch(root / "bounding_box_test", "0002_c3s1_000551_01.jpg")
    splits = datasets.load_dataset("market1501", tmp_path)
    assert [len(splits.train), len(splits.query), len(splits.gallery)] == [1, 1, 1]
    assert splits.train[0].path.parent == (root / "bounding_box_train").absolute()


def test_missing_folders_and_unknown_names_fail_loudly(tmp_path: Path, market: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'market'.*market1501, dukemtmc, msmt17"):
        datasets.load_dataset("market", market)
    with pytest.raises(FileNotFoundError, match=r"no dukemtmc data set found at .*DukeMTMC-reID"):
        datasets.load_dataset("dukemtmc", tmp_path / "Market-1501-v15.09.15" / "query")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        datasets.load_dataset("market1501", tmp_path / "nowhere")
    for f in (market / "bounding_box_test").iterdir():
        f.unlink()
    (market / "bounding_box_test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"bounding_box_test; expected the gallery images"):
        datasets.load_dataset("market1501", market)


def test_bad_names_raise_when_strict_and_are_skipped_otherwise(market: Path) -> None:
    touch(market / "query", "holiday_photo.jpg", "0002_c9s1_000001_00.jpg")
    with pytest.raises(ValueError, match=r"2 file.* do not parse.*dualref data check"):
        datasets.load_dataset("market1501", market)
    splits = datasets.load_dataset("market1501", market, strict=False)
    assert len(splits.query) == 2
    problems = datasets.load_dataset_report("market1501", market).problems
    assert sorted(p.path.name for p in problems) == ["0002_c9s1_000001_00.jpg", "holiday_photo.jpg"]


def test_duke_cameras_are_zero_based(tmp_path: Path) -> None:
    root = tmp_path / "DukeMTMC-reID"
    touch(root / "bounding_box_train", "0001_c2_f0046182.jpg", "0001_c8_f0047082.jpg")
    touch(root / "query", "0005_c2_f0046985.jpg")
    touch(root / "bounding_box_test", "0005_c5_f0051781.jpg", "0008_c1_f0000001.jpg")
    splits = datasets.load_dataset("dukemtmc", tmp_path)
    assert triples(splits.train) == [("0001_c2_f0046182.jpg", 1, 1), ("0001_c8_f0047082.jpg", 1, 7)]
    assert triples(splits.gallery) == [("0005_c5_f0051781.jpg", 5, 4), ("0008_c1_f0000001.jpg", 8, 0)]


def write_msmt(root: Path, train_dir: str, test_dir: str, prefix: str = "") -> None:
    """A tiny MSMT17 in the official layout: list paths relative to the image folder (or ``prefix``)."""
    train = ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303noon_0020_1.jpg 0"]
    val = ["0001/0001_000_15_0303afternoon_0100_0.jpg 1"]
    query = ["0000/0000_000_03_0303morning_0001_0.jpg 0"]
    gallery = ["0000/0000_002_07_0303morning_0002_0.jpg 0", "0003/0003_000_02_0303noon_0003_0.jpg 3"]
    for name, lines, folder in (
        ("list_train.txt", train, train_dir),
        ("list_val.txt", val, train_dir),
        ("list_query.txt", query, test_dir),
        ("list_gallery.txt", gallery, test_dir),
    ):
        (root).mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(f"{prefix and folder + '/'}{ln}\n" for ln in lines))
        touch(root / folder, *(ln.split()[0] for ln in lines))


@pytest.mark.parametrize(
    ("version", "train_dir", "test_dir"),
    [("MSMT17_V1", "train", "test"), ("MSMT17_V2", "mask_train_v2", "mask_test_v2")],
)
@pytest.mark.parametrize("prefix", ["", "folder"])
def test_msmt17_list_files(
    tmp_path: Path, version: str, train_dir: str, test_dir: str, prefix: str
) -> None:
    root = tmp_path / "msmt17" / version
    write_msmt(root, train_dir, test_dir, prefix)
    splits = datasets.load_dataset("msmt17", tmp_path)  # parent of a parent: msmt17/MSMT17_Vx
    # train = list_train + list_val; camera = third field, 1-based in names -> 0-based.
    assert triples(splits.train) == [
        ("0000_000_01_0303morning_0015_0.jpg", 0, 0),
        ("0000_001_05_0303noon_0020_1.jpg", 0, 4),
        ("0001_000_15_0303afternoon_0100_0.jpg", 1, 14),
    ]
    assert triples(splits.query) == [("0000_000_03_0303morning_0001_0.jpg", 0, 2)]
    assert triples(splits.gallery) == [
        ("0000_002_07_0303morning_0002_0.jpg", 0, 6),
        ("0003_000_02_0303noon_0003_0.jpg", 3, 1),
    ]
    assert all(s.path.is_file() for s in splits.train + splits.query + splits.gallery)
    assert splits.train[0].path.parent.parent.name == train_dir


def test_msmt17_bad_lines_and_missing_lists(tmp_path: Path) -> None:
    root = tmp_path / "MSMT17_V1"
    write_msmt(root, "train", "test")
    with (root / "list_query.txt").open("a") as f:
        f.write("0000/nocamera.jpg 0\n0000/0000_000_01_x_0001_0.jpg\n")
    report = datasets.load_dataset_report("msmt17", root)
    assert len(report.problems) == 2
    assert all("list_query.txt:" in str(p.path) for p in report.problems)
    (root / "list_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"list_val.txt"):
        datasets.load_dataset("msmt17", root)


def test_folder_labelled_by_name(tmp_path: Path) -> None:
    touch(tmp_path / "bounding_box_train", "12_c0_a.jpg", "12_c3_b.png", "40_c1_x.JPG", "-1_c1_j.jpg")
    touch(tmp_path / "query", "12_c1_q.jpg")
    touch(tmp_path / "bounding_box_test", "12_c0_g.jpg", "40_c3_g.jpg")
    report = datasets.load_dataset_report("folder", tmp_path)
    # Camera numbers 0, 1, 3 over the whole data set -> 0, 1, 2.
    assert triples(report.splits.train) == [("12_c0_a.jpg", 12, 0), ("12_c3_b.png", 12, 2),
                                            ("40_c1_x.JPG", 40, 1)]
    assert triples(report.splits.query) == [("12_c1_q.jpg", 12, 1)]
    assert report.num_junk["train"] == 1


def test_folder_labelled_by_subfolder(tmp_path: Path) -> None:
    touch(tmp_path / "bounding_box_train" / "bob", "x_c2_1.jpg", "y_c1_2.jpg")
    touch(tmp_path / "bounding_box_train" / "alice", "img.jpg")
    touch(tmp_path / "query" / "carol", "a_c2.jpg")
    touch(tmp_path / "bounding_box_test" / "alice", "b_c1.jpg")
    touch(tmp_path / "bounding_box_test" / "carol", "c_c1.jpg")
    splits = datasets.load_dataset("folder", tmp_path)
    # Names sorted over all splits: alice 0, bob 1, carol 2. Cameras: none -> 0, c1 -> 1, c2 -> 2.
    assert triples(splits.train) == [("img.jpg", 0, 0), ("x_c2_1.jpg", 1, 2), ("y_c1_2.jpg", 1, 1)]
    assert triples(splits.query) == [("a_c2.jpg", 2, 2)]
    assert triples(splits.gallery) == [("b_c1.jpg", 0, 1), ("c_c1.jpg", 2, 1)]


def test_folder_mixing_named_files_and_named_identity_folders_never_collides(tmp_path: Path) -> None:
    touch(tmp_path / "query", "5_c1_a.jpg")
    touch(tmp_path / "query" / "zoe", "b.jpg")
    splits = datasets.load_dataset("folder", tmp_path)
    assert triples(splits.query) == [("5_c1_a.jpg", 5, 1), ("b.jpg", 6, 0)]  # zoe numbered after 5


def test_folder_numeric_subfolders_keep_their_pid(tmp_path: Path) -> None:
    touch(tmp_path / "bounding_box_train" / "0017", "a.jpg")
    touch(tmp_path / "bounding_box_train" / "0003", "b.jpg")
    splits = datasets.load_dataset("folder", tmp_path)
    assert triples(splits.train) == [("b.jpg", 3, 0), ("a.jpg", 17, 0)]
    assert splits.query == [] and splits.gallery == []
    with pytest.raises(FileNotFoundError, match=r"bounding_box_train/, query/, bounding_box_test/"):
        datasets.load_dataset("folder", tmp_path / "bounding_box_train" / "0017")


def test_folder_never_follows_linked_folders_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 13 row 7: links to folders used to become extra identities (a loop: the split itself).
    train = tmp_path / "bounding_box_train"
    touch(train / "alice", "a_c1.jpg", "b_c2.jpg")
    (train / "alice_again").symlink_to(train / "alice")  # would duplicate alice's images
    (train / "loop").symlink_to(train)  # a link back to the split folder
    (train / "alice" / "self.jpg").symlink_to(train / "alice" / "self.jpg")  # a link to itself
    with caplog.at_level(logging.WARNING, logger="dualref"):
        splits = datasets.load_dataset("folder", tmp_path)
    assert triples(splits.train) == [("a_c1.jpg", 0, 0), ("b_c2.jpg", 0, 1)]
    report = datasets.load_dataset_report("folder", tmp_path)
    assert [(p.path.name, p.reason) for p in report.ignored] == [
        ("self.jpg", "not read: Too many levels of symbolic links"),
        ("alice_again", "not read: a symbolic link to a folder"),
        ("loop", "not read: a symbolic link to a folder"),
    ]
    assert f"3 entries of folder at {tmp_path} are not read" in caplog.text


def test_market_reports_the_png_files_it_does_not_read(
    market: Path, caplog: pytest.LogCaptureFixture
) -> None:
    touch(market / "query", "0002_c3s1_000302_00.png")
    with caplog.at_level(logging.WARNING, logger="dualref"):
        splits = datasets.load_dataset("market1501", market)
    assert len(splits.query) == 2  # still .jpg only, as the data set is distributed
    assert "0002_c3s1_000302_00.png: not read: this layout reads .jpg images only" in caplog.text


def test_unlabelled_with_and_without_camera_pattern(tmp_path: Path) -> None:
    touch(tmp_path / "cams", "0001_c3s1_01.jpg", "x_c5.png", "sub/c1_frame.jpeg", "notes.txt")
    splits = datasets.load_dataset("unlabelled", tmp_path / "cams")
    assert splits.query == [] and splits.gallery == []
    # Camera numbers 1, 3, 5 -> 0, 1, 2; every pid -1; recursive; text file ignored.
    assert sorted(triples(splits.train)) == [("0001_c3s1_01.jpg", -1, 1), ("c1_frame.jpeg", -1, 0),
                                             ("x_c5.png", -1, 2)]
    touch(tmp_path / "plain", "a.jpg", "b.jpg")
    plain = datasets.load_dataset("unlabelled", tmp_path / "plain")
    assert triples(plain.train) == [("a.jpg", -1, 0), ("b.jpg", -1, 0)]
    touch(tmp_path / "empty", "readme.txt")
    with pytest.raises(FileNotFoundError, match=r"no images under"):
        datasets.load_dataset("unlabelled", tmp_path / "empty")


def test_dataset_names_are_all_loadable() -> None:
    assert set(datasets.DATASET_NAMES) == {"market1501", "dukemtmc", "msmt17", "folder", "unlabelled"}


def split_counts(splits: ReidSplits) -> list[tuple[int, int, int]]:
    return [(len(s), num_pids(s), num_cameras(s)) for s in (splits.train, splits.query, splits.gallery)]


@pytest.mark.realdata
def test_real_market1501_counts() -> None:
    report = datasets.load_dataset_report("market1501", shared_dataset("Market-1501"))
    # Gallery ids: 750 test ids + the distractor id 0.
    assert split_counts(report.splits) == [(12936, 751, 6), (3368, 750, 6), (15913, 751, 6)]
    assert report.num_junk == {"train": 0, "query": 0, "gallery": 3819}
    assert report.problems == []


@pytest.mark.realdata
def test_real_dukemtmc_counts() -> None:
    report = datasets.load_dataset_report("dukemtmc", shared_dataset("DukeMTMC-reID"))
    assert split_counts(report.splits) == [(16522, 702, 8), (2228, 702, 8), (17661, 1110, 8)]
    assert report.problems == []
