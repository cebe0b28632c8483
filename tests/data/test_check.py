"""``dualref data check`` on small generated data sets: counts, sizes, and every kind of problem."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset
from dualref import cli
from dualref.data import check


def write_market(root: Path) -> None:
    """2 train ids, 2 query ids, gallery with a distractor and one junk image; images 16 x 32 or 20 x 40."""
    rng = np.random.default_rng(0)
    files = {
        "bounding_box_train": ["0001_c1s1_01.jpg", "0001_c2s1_01.jpg", "0003_c1s1_01.jpg"],
        "query": ["0001_c1s1_02.jpg", "0003_c3s1_02.jpg"],
        "bounding_box_test": ["0000_c1s1_03.jpg", "-1_c1s1_03.jpg", "0001_c2s1_03.jpg", "0003_c4s1_03.jpg"],
    }
    for folder, names in files.items():
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(names):
            width, height = (16, 32) if i % 2 == 0 else (20, 40)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / name)


def report(root: Path, **kwargs: bool) -> tuple[int, str]:
    out = io.StringIO()
    status = check.run_check(root, dataset="market1501", out=out, **kwargs)
    return status, out.getvalue()


def test_clean_data_set_reports_counts_sizes_and_no_problem(tmp_path: Path) -> None:
    write_market(tmp_path)
    status, text = report(tmp_path)
    assert status == 0
    lines = text.splitlines()
    # split, images, ids, cameras, junk dropped
    assert [ln.split() for ln in lines if ln.split()[:1] in (["train"], ["query"], ["gallery"])] == [
        ["train", "3", "2", "2", "0"],
        ["query", "2", "2", "2", "0"],
        ["gallery", "3", "3", "3", "1"],
    ]
    # 8 readable images: widths 16,20,16 | 16,20 | 16,16,20 -> min 16, median 16, max 20.
    assert "over 8 images" in text and "width 16 / 16 / 20, height 32 / 32 / 40" in text
    assert text.rstrip().endswith("no problems found")
    result = check.check_dataset(tmp_path, dataset="market1501", verify_images=False)
    assert result.errors == [] and result.sizes is not None and result.sizes.num_images == 8


def test_every_problem_is_reported_and_the_exit_status_is_1(tmp_path: Path) -> None:
    write_market(tmp_path)
    bad_jpeg = tmp_path / "bounding_box_train" / "0003_c1s1_01.jpg"
    data = bad_jpeg.read_bytes()
    bad_jpeg.write_bytes(data[: len(data) * 3 // 4])  # truncated after an intact header
    Image.new("RGB", (16, 32)).save(tmp_path / "query" / "0009_c1s1_09.jpg")  # id absent from gallery
    (tmp_path / "query" / "IMG_1234.jpg").write_bytes(b"")  # does not parse
    Image.new("RGB", (16, 32)).save(tmp_path / "query" / "0003_c4s1_09.jpg")  # only same-camera match
    status, text = report(tmp_path)
    assert status == 1
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3
    assert any("IMG_1234.jpg" in e and "does not match" in e for e in errors)
    assert any("0003_c1s1_01.jpg: unreadable image" in e for e in errors)
    assert any("1 query identities absent from the gallery: 9" in e for e in errors)
    warnings = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "0003_c4s1_09.jpg" in warnings[0]
    # Without decoding, the truncated file goes unnoticed (its header is intact).
    status, text = report(tmp_path, verify_images=False)
    assert "unreadable" not in text and status == 1


def test_entries_the_loader_skips_are_warnings(tmp_path: Path) -> None:
    write_market(tmp_path)
    Image.new("RGB", (16, 32)).save(tmp_path / "query" / "0001_c2s1_05.png")
    (tmp_path / "query" / "linked").symlink_to(tmp_path / "bounding_box_train")
    status, text = report(tmp_path)
    assert status == 0  # the data set itself is fine
    warnings = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'query' / '0001_c2s1_05.png'}: not read: this layout reads .jpg images only",
        f"warning: {tmp_path / 'query' / 'linked'}: not read: a symbolic link to a folder",
    ]


def test_empty_split_is_an_error_and_cli_exit_codes(tmp_path: Path) -> None:
    write_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    status, text = report(tmp_path)
    assert status == 1 and "error: split query is empty" in text
    assert cli.main(["data", "check", str(tmp_path), "--dataset", "market1501"]) == 1
    assert cli.main(["data", "check", str(tmp_path / "nowhere"), "--dataset", "market1501"]) == 2
    assert cli.main(["data", "check", str(tmp_path), "--dataset", "cuhk03"]) == 2


def test_unlabelled_needs_no_query_or_gallery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_market(tmp_path)
    assert cli.main(["data", "check", str(tmp_path), "--dataset", "unlabelled"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    # all 9 images (junk included: nothing is parsed), pid -1, cameras c1..c4 -> 4 cameras
    assert ["train", "9", "1", "4", "0"] in lines and ["query", "0", "0", "0", "0"] in lines


@pytest.mark.slow
@pytest.mark.realdata
def test_real_market1501_report() -> None:
    out = io.StringIO()
    root = shared_dataset("Market-1501")
    status = check.run_check(root, dataset="market1501", verify_images=False, out=out)
    lines = [ln.split() for ln in out.getvalue().splitlines()]
    assert status == 0
    assert ["train", "12,936", "751", "6", "0"] in lines
    assert ["query", "3,368", "750", "6", "0"] in lines
    assert ["gallery", "15,913", "751", "6", "3,819"] in lines
