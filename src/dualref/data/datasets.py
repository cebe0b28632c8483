"""Parsers for the re-ID data sets as they are distributed: file names and list files to Samples.

Every loader returns a :class:`~dualref.data.records.ReidSplits` whose samples are sorted by path (so
results never depend on directory order), with 0-based camera ids and raw ground-truth pids (training
labels come from :func:`~dualref.data.records.relabel_pids`). Nothing here opens an image.

Layouts (``root`` may be the data set folder itself or a parent holding it under a usual name):

* ``market1501``: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of ``*.jpg`` named
  ``PID_cCsS_FRAME_BOX.jpg``. Junk (pid -1) is dropped everywhere and counted; distractors (pid 0) stay
  in the gallery. Cameras c1..c6 become 0..5.
* ``dukemtmc``: the same three folders, names ``PID_cC_fFRAME.jpg``, cameras c1..c8 become 0..7.
* ``msmt17``: ``MSMT17_V1/`` (image folders ``train/``, ``test/``) or ``MSMT17_V2/`` (``mask_train_v2/``,
  ``mask_test_v2/``), with ``list_train.txt``, ``list_val.txt``, ``list_query.txt``,
  ``list_gallery.txt``; each line is ``RELPATH LABEL``. train = list_train + list_val. The pid is the
  list label; the camera is the third ``_`` field of the file name (``0000_000_01_0303morning_0015_0.jpg``
  is camera 1, camid 0). The authors' code kept MSMT17 cameras 1-based; we subtract 1 like for the other
  sets, which changes no result (cameras are only compared for equality). List paths are resolved
  against the split's image folder, falling back to the data set folder (both conventions exist).
* ``folder``: a user's labelled data in the Market layout (``bounding_box_train/``, ``query/``,
  ``bounding_box_test/``; a missing sub-folder is an empty split). Inside each split, an image is
  labelled either by its name, ``PID_cCAM_anything.ext`` (pid -1 = junk, dropped and counted), or by
  the sub-folder holding it (``query/<identity>/<image>``, camera from a ``cN`` name field if present).
  Identity folders named by integers keep that pid; otherwise folder names across all splits are
  sorted and numbered 0..K-1 (after the largest pid parsed from file names, if any), so query and
  gallery agree. Images deeper than one sub-folder level are not read.
* ``unlabelled``: every image under ``root``, recursively, in ``.train`` with pid -1 (query and gallery
  empty).

For ``folder`` and ``unlabelled`` the camera numbers written in the names (any base) are mapped to
0..C-1 in sorted order over the whole data set; images without a camera field get the lowest
camera id. Image extensions: .jpg .jpeg .png .bmp (any case) for these two; ``*.jpg`` for Market/Duke.

Size: over 400 lines: six layouts (Market-1501, DukeMTMC-reID, MSMT17 V1/V2, folder, unlabelled) and the
report of every entry a layout does not read.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dualref.data.records import ReidSplits, Sample

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("market1501", "dukemtmc", "msmt17", "folder", "unlabelled")
SPLIT_NAMES: tuple[str, ...] = ("train", "query", "gallery")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MSMT_IMAGE_FOLDERS = {
    "MSMT17_V1": ("train", "test"),
    "MSMT17_V2": ("mask_train_v2", "mask_test_v2"),
}

# Folder names under which a data set is usually unpacked, tried below ``root`` in this order.
_USUAL_NAMES: dict[str, tuple[str, ...]] = {
    "market1501": (
        "Market-1501-v15.09.15",
        "Market-1501",
        "market1501",
        "market1501/Market-1501-v15.09.15",
        "Market1501",
        "market",
    ),
    "dukemtmc": (
        "DukeMTMC-reID",
        "dukemtmc",
        "dukemtmc/DukeMTMC-reID",
        "dukemtmcreid",
        "dukemtmc-reid",
        "DukeMTMC",
    ),
    "msmt17": (
        "MSMT17_V1",
        "MSMT17_V2",
        "msmt17",
        "MSMT17",
        "msmt17/MSMT17_V1",
        "msmt17/MSMT17_V2",
        "MSMT17/MSMT17_V1",
        "MSMT17/MSMT17_V2",
    ),
}

# Files or folders whose presence identifies a data set folder, and what to say when none is found.
_MARKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "market1501": (("bounding_box_train", "query"), "bounding_box_train/, query/, bounding_box_test/"),
    "dukemtmc": (("bounding_box_train", "query"), "bounding_box_train/, query/, bounding_box_test/"),
    "msmt17": (("list_query.txt",), "list_{train,val,query,gallery}.txt and the image folders"),
}

_PID_CAM = re.compile(r"^(-?\d+)_c(\d+)")  # Market / Duke / labelled folder: "0002_c1s1_...", "-1_c3..."
_CAM_FIELD = re.compile(r"(?:^|_)c(\d+)")  # a camera field anywhere in a name: "x_c3_...", "c2s1_..."


@dataclass(frozen=True)
class ParseProblem:
    """A file the parser could not use."""

    path: Path
    reason: str


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_dataset_report` found, beyond the splits themselves."""

    splits: ReidSplits
    root: Path  # the resolved data set folder
    num_junk: dict[str, int] = field(default_factory=dict)  # split name -> junk images (pid -1) dropped
    problems: list[ParseProblem] = field(default_factory=list)  # names or list lines that do not parse
    # Entries deliberately not read: symbolic links to folders (a link to an identity folder would make
    # a duplicate identity, a loop an endless one), broken links, image types the layout does not read.
    ignored: list[ParseProblem] = field(default_factory=list)


def load_dataset(name: str, root: str | Path, *, strict: bool = True) -> ReidSplits:
    """Parse a re-ID data set into train / query / gallery samples.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: the data set folder, or a folder holding it under one of its usual names.
        strict: raise when a file name or list line does not parse; when False such files are skipped
            with a warning (``dualref data check`` lists them all).

    Returns:
        The splits, each sorted by path; camids 0-based; pids raw (Market junk dropped).

    Raises:
        ValueError: unknown ``name``, or (strict) files whose names do not parse.
        FileNotFoundError: the data set folder or one of its required parts is missing.
    """
    report = load_dataset_report(name, root)
    if report.ignored:
        shown = "; ".join(f"{p.path}: {p.reason}" for p in report.ignored[:3])
        log.warning(
            "%d entries of %s at %s are not read, e.g. %s; run `dualref data check %s --dataset %s` for "
            "the full list",
            len(report.ignored),
            name,
            report.root,
            shown,
            root,
            name,
        )
    if report.problems:
        shown = "; ".join(f"{p.path}: {p.reason}" for p in report.problems[:3])
        message = (
            f"{len(report.problems)} file(s) of {name} at {report.root} do not parse, e.g. {shown}; "
            f"run `dualref data check {root} --dataset {name}` for the full list"
        )
        if strict:
            raise ValueError(message)
        log.warning("%s (skipped)", message)
    return report.splits


def load_dataset_report(name: str, root: str | Path) -> LoadReport:
    """Like :func:`load_dataset`, never strict, and also returning junk counts and parse problems."""
    parsers: dict[str, Callable[[Path], LoadReport]] = {
        "market1501": _load_market1501,
        "dukemtmc": _load_dukemtmc,
        "msmt17": _load_msmt17,
        "folder": _load_folder,
        "unlabelled": _load_unlabelled,
    }
    if name not in parsers:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    root = Path(root).expanduser()
    if root.is_symlink() and not root.exists():
        raise FileNotFoundError(
            f"data set folder {root} is a symbolic link that leads nowhere (broken, or a loop; data set "
            f"{name!r}): point it at the data set folder"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist (data set {name!r})")
    return parsers[name](root.absolute())


def resolve_root(name: str, root: Path) -> Path:
    """The folder that holds data set ``name``: ``root`` itself or ``root/<usual name>``.

    Raises:
        FileNotFoundError: naming every place looked at and what was expected there.
    """
    if name not in _MARKERS:
        return root
    markers, expected = _MARKERS[name]
    candidates = [root, *(root / usual for usual in _USUAL_NAMES[name])]
    for candidate in candidates:
        if candidate.is_dir() and any((candidate / m).exists() for m in markers):
            return candidate
    raise FileNotFoundError(
        f"no {name} data set found at {root} or below it under "
        f"{', '.join(_USUAL_NAMES[name])}; expected a folder holding {expected}"
    )


@dataclass
class _Scan:
    """The entries of one folder (not recursive), each list sorted."""

    images: list[Path] = field(default_factory=list)  # files with a wanted extension (links to files too)
    folders: list[Path] = field(default_factory=list)  # real sub-folders, never links
    ignored: list[ParseProblem] = field(default_factory=list)  # see `LoadReport.ignored`


def _scan(folder: Path, extensions: Iterable[str] = (".jpg",)) -> _Scan:
    """Image files and sub-folders directly inside ``folder``; links to folders and broken links are
    ignored and reported, as are image files of another type than ``extensions``."""
    wanted = {e.lower() for e in extensions}
    scan = _Scan()
    with os.scandir(folder) as entries:
        for entry in entries:
            path, suffix = Path(entry.path), os.path.splitext(entry.name)[1].lower()
            try:
                is_file, is_dir = entry.is_file(), entry.is_dir()
            except OSError as err:  # e.g. a link to itself: "too many levels of symbolic links"
                scan.ignored.append(ParseProblem(path, f"not read: {err.strerror or err}"))
                continue
            if is_dir and entry.is_symlink():
                scan.ignored.append(ParseProblem(path, "not read: a symbolic link to a folder"))
            elif is_dir:
                scan.folders.append(path)
            elif not is_file and entry.is_symlink():
                scan.ignored.append(ParseProblem(path, "not read: a broken symbolic link"))
            elif is_file and suffix in wanted:
                scan.images.append(path)
            elif is_file and suffix in IMAGE_EXTENSIONS:
                expected = ", ".join(sorted(wanted))
                scan.ignored.append(ParseProblem(path, f"not read: this layout reads {expected} images only"))
    scan.images.sort()
    scan.folders.sort()
    scan.ignored.sort(key=lambda p: p.path)
    return scan


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"missing folder {path}; expected {what}")
    return path


def _load_market_like(name: str, root: Path, num_cameras: int) -> LoadReport:
    root = resolve_root(name, root)
    splits: dict[str, list[Sample]] = {}
    num_junk: dict[str, int] = {}
    problems: list[ParseProblem] = []
    ignored: list[ParseProblem] = []
    for split, sub in MARKET_FOLDERS.items():
        folder = _require_dir(root / sub, f"the {split} images of {name}")
        samples: list[Sample] = []
        junk = 0
        scan = _scan(folder)
        ignored += scan.ignored
        for path in scan.images:
            match = _PID_CAM.match(path.name)
            if match is None:
                problems.append(ParseProblem(path, "name does not match PID_cCAM_*.jpg"))
                continue
            pid, cam = int(match.group(1)), int(match.group(2))
            if pid == -1:
                junk += 1
                continue
            if pid < 0 or not 1 <= cam <= num_cameras:
                problems.append(
                    ParseProblem(path, f"pid {pid} or camera {cam} out of range (0.., 1..{num_cameras})")
                )
                continue
            samples.append(Sample(path, pid, cam - 1))
        splits[split] = samples
        num_junk[split] = junk
    found = ReidSplits(name, splits["train"], splits["query"], splits["gallery"])
    return LoadReport(found, root, num_junk, problems, ignored)


def _load_market1501(root: Path) -> LoadReport:
    return _load_market_like("market1501", root, num_cameras=6)


def _load_dukemtmc(root: Path) -> LoadReport:
    return _load_market_like("dukemtmc", root, num_cameras=8)


def _msmt_image_folders(root: Path) -> tuple[Path, Path]:
    """(train, test) image folders of an MSMT17 folder, V1 or V2, whatever the folder is called."""
    for train_name, test_name in (MSMT_IMAGE_FOLDERS[v] for v in ("MSMT17_V1", "MSMT17_V2")):
        if (root / train_name).is_dir() or (root / test_name).is_dir():
            return root / train_name, root / test_name
    raise FileNotFoundError(
        f"no MSMT17 image folders in {root}; expected train/ and test/ (V1) "
        "or mask_train_v2/ and mask_test_v2/ (V2)"
    )


def _parse_msmt_list(
    list_file: Path, image_folder: Path, root: Path, problems: list[ParseProblem]
) -> list[Sample]:
    if not list_file.is_file():
        raise FileNotFoundError(f"missing list file {list_file}; expected lines 'RELPATH LABEL'")
    lines = [ln.split() for ln in list_file.read_text().splitlines() if ln.strip()]
    # List paths are relative to the split's image folder in the official lists; some re-packs make them
    # relative to the data set folder. Decide once per list from the first entry that exists.
    base = image_folder
    for fields in lines[:20]:
        if not (image_folder / fields[0]).is_file() and (root / fields[0]).is_file():
            base = root
            break
        if (image_folder / fields[0]).is_file():
            break
    samples = []
    for number, fields in enumerate(lines, start=1):
        where = Path(f"{list_file}:{number}")
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            problems.append(ParseProblem(where, f"expected 'RELPATH LABEL', got {' '.join(fields)!r}"))
            continue
        name_fields = Path(fields[0]).name.split("_")
        if len(name_fields) < 3 or not name_fields[2].isdigit() or int(name_fields[2]) < 1:
            problems.append(ParseProblem(where, f"no camera field in {fields[0]!r}"))
            continue
        samples.append(Sample(base / fields[0], int(fields[1]), int(name_fields[2]) - 1))
    return samples


def _load_msmt17(root: Path) -> LoadReport:
    root = resolve_root("msmt17", root)
    train_folder, test_folder = _msmt_image_folders(root)
    problems: list[ParseProblem] = []

    def read(list_name: str, folder: Path) -> list[Sample]:
        return _parse_msmt_list(root / list_name, folder, root, problems)

    train = read("list_train.txt", train_folder) + read("list_val.txt", train_folder)
    query = read("list_query.txt", test_folder)
    gallery = read("list_gallery.txt", test_folder)
    splits = ReidSplits("msmt17", _by_path(train), _by_path(query), _by_path(gallery))
    return LoadReport(splits, root, {s: 0 for s in SPLIT_NAMES}, problems)


def _by_path(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: s.path)


def _camera_number(name: str) -> int:
    """Camera number written in a file name, -1 when there is none."""
    match = _CAM_FIELD.search(name)
    return int(match.group(1)) if match else -1


def _remap_cameras(samples: list[Sample]) -> list[Sample]:
    """Replace raw camera numbers (-1 = none) by 0..C-1 in sorted order."""
    index = {cam: i for i, cam in enumerate(sorted({s.camid for s in samples}))}
    return [Sample(s.path, s.pid, index[s.camid]) for s in samples]


def _load_folder(root: Path) -> LoadReport:
    present = {split: root / sub for split, sub in MARKET_FOLDERS.items() if (root / sub).is_dir()}
    if not present:
        raise FileNotFoundError(
            f"no labelled data in {root}; expected sub-folders bounding_box_train/, query/, "
            "bounding_box_test/ holding PID_cCAM_*.jpg images or one sub-folder per identity"
        )
    problems: list[ParseProblem] = []
    ignored: list[ParseProblem] = []
    num_junk = {s: 0 for s in SPLIT_NAMES}
    # Raw entries: (path, pid or identity-folder name, raw camera number)
    raw: dict[str, list[tuple[Path, int | str, int]]] = {s: [] for s in SPLIT_NAMES}
    for split, folder in present.items():
        scan = _scan(folder, IMAGE_EXTENSIONS)
        ignored += scan.ignored
        for path in scan.images:
            match = _PID_CAM.match(path.name)
            if match is None:
                problems.append(
                    ParseProblem(path, "name does not match PID_cCAM_* (or put it in an identity folder)")
                )
            elif int(match.group(1)) == -1:
                num_junk[split] += 1
            elif int(match.group(1)) < -1:
                problems.append(ParseProblem(path, f"negative pid {match.group(1)}"))
            else:
                raw[split].append((path, int(match.group(1)), int(match.group(2))))
        for identity in scan.folders:
            inside = _scan(identity, IMAGE_EXTENSIONS)
            ignored += inside.ignored
            for path in inside.images:
                raw[split].append((path, identity.name, _camera_number(path.name)))
    folder_names = {pid for entries in raw.values() for _, pid, _ in entries if isinstance(pid, str)}
    if all(name.isdigit() for name in folder_names):
        folder_pid = {name: int(name) for name in folder_names}
    else:
        # Named identities are numbered after any pid parsed from file names, so the two never collide.
        first = 1 + max((pid for e in raw.values() for _, pid, _ in e if isinstance(pid, int)), default=-1)
        folder_pid = {name: first + i for i, name in enumerate(sorted(folder_names))}
    camid = {cam: i for i, cam in enumerate(sorted({c for e in raw.values() for _, _, c in e}))}
    train, query, gallery = (
        _by_path(
            [Sample(p, folder_pid[pid] if isinstance(pid, str) else pid, camid[c]) for p, pid, c in raw[s]]
        )
        for s in SPLIT_NAMES
    )
    ignored.sort(key=lambda p: p.path)
    return LoadReport(ReidSplits("folder", train, query, gallery), root, num_junk, problems, ignored)


def _load_unlabelled(root: Path) -> LoadReport:
    paths: list[Path] = []
    ignored: list[ParseProblem] = []
    for dirpath, folders, names in os.walk(root):  # links to folders are listed, never followed
        ignored += [
            ParseProblem(Path(dirpath) / d, "not read: a symbolic link to a folder")
            for d in folders
            if os.path.islink(os.path.join(dirpath, d))
        ]
        for name in names:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if os.path.isfile(os.path.join(dirpath, name)):
                paths.append(Path(dirpath) / name)
            else:  # a broken link, or a link loop
                ignored.append(ParseProblem(Path(dirpath) / name, "not read: a broken symbolic link"))
    if not paths:
        raise FileNotFoundError(
            f"no images under {root}; expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    samples = _remap_cameras([Sample(p, -1, _camera_number(p.name)) for p in paths])
    return LoadReport(
        ReidSplits("unlabelled", _by_path(samples), [], []),
        root,
        {s: 0 for s in SPLIT_NAMES},
        [],
        sorted(ignored, key=lambda p: p.path),
    )
