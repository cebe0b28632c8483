"""Tests of the synthetic domain pair: determinism, Market-1501 layout, viewpoint-dependent accessories,
domain differences, and that raw pixels do not solve the task."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dualref import cli
from dualref.data import synthetic
from dualref.data.synthetic import SyntheticConfig

MARKET_NAME = re.compile(r"^([-\d]+)_c(\d)s1_\d{6}_\d{2}\.jpg$")

# Small images and few ids keep every test well under a second.
TINY = SyntheticConfig(
    name="tiny",
    num_train_ids=6,
    num_test_ids=5,
    images_per_id=6,
    num_cameras=3,
    num_distractors=4,
    height=64,
    width=32,
)


def _parse_tree(root: Path) -> dict[str, list[tuple[int, int]]]:
    """(pid, 1-based camera) of every image of each split folder, parsed like a Market-1501 loader."""
    out: dict[str, list[tuple[int, int]]] = {}
    for split in synthetic.SPLIT_DIRS:
        entries = []
        for path in sorted((root / split).iterdir()):
            match = MARKET_NAME.match(path.name)
            assert match is not None, f"unparsable name {path.name}"
            entries.append((int(match.group(1)), int(match.group(2))))
        out[split] = entries
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def naive_map_rank1(
    dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray, g_cams: np.ndarray
) -> tuple[float, float]:
    """Market-1501 protocol, one query at a time: drop same-pid-same-camera gallery entries, skip queries
    with no remaining match; AP = mean over matches of (matches so far / rank)."""
    aps, hits = [], []
    for i in range(len(q_pids)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        order = np.argsort(dist[i][keep], kind="stable")
        matches = (g_pids[keep] == q_pids[i])[order]
        if not matches.any():
            continue
        ranks = np.flatnonzero(matches) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        hits.append(bool(matches[0]))
    return float(np.mean(aps)), float(np.mean(hits))


def test_naive_map_golden() -> None:
    # Query pid 1 cam 0. Gallery sorted by distance: [pid 1 cam 0 (ignored: same camera), pid 2, pid 1 cam 1,
    # pid 1 cam 2]. Remaining ranks of matches: 2 and 3 -> AP = (1/2 + 2/3) / 2 = 7/12; rank-1 miss.
    dist = np.array([[0.0, 1.0, 2.0, 3.0]])
    mean_ap, rank1 = naive_map_rank1(
        dist, np.array([1]), np.array([1, 2, 1, 1]), np.array([0]), np.array([0, 0, 1, 2])
    )
    assert mean_ap == pytest.approx(7 / 12)
    assert rank1 == 0.0


def test_render_shapes_and_dtype() -> None:
    domain = synthetic.render_domain(TINY, seed=0)
    n = (TINY.num_train_ids + TINY.num_test_ids) * TINY.images_per_id + TINY.num_distractors
    assert domain.images.shape == (n, TINY.height, TINY.width, 3)
    assert domain.images.dtype == np.uint8
    assert domain.pids.shape == domain.camids.shape == domain.splits.shape == (n,)
    # Not blank: real images use a good part of the intensity range.
    assert domain.images.std() > 20


def test_same_seed_same_pixels_and_different_seed_differs() -> None:
    first = synthetic.render_domain(TINY, seed=5)
    second = synthetic.render_domain(TINY, seed=5)
    other = synthetic.render_domain(TINY, seed=6)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.pids, second.pids)
    assert np.abs(first.images.astype(int) - other.images.astype(int)).mean() > 10


def test_an_images_pixels_do_not_depend_on_the_batch_it_is_rendered_in() -> None:
    # write_domain renders chunk by chunk; any subset of rows, in any order, must give the same pixels.
    plan = synthetic.plan_domain(TINY, seed=1)
    full = synthetic.render_plan(plan)
    rows = np.random.default_rng(0).permutation(len(plan.pids))[:17]
    np.testing.assert_array_equal(synthetic.render_plan(plan, rows), full[rows])


def test_write_domain_is_byte_identical_per_seed(tmp_path: Path) -> None:
    first = synthetic.write_domain(tmp_path / "one", TINY, seed=3)
    second = synthetic.write_domain(tmp_path / "two", TINY, seed=3)
    assert first.name == second.name == "tiny"
    assert _tree_bytes(first) == _tree_bytes(second)
    other = synthetic.write_domain(tmp_path / "three", TINY, seed=4)
    assert _tree_bytes(first) != _tree_bytes(other)


def test_market_layout_counts_and_disjoint_ids(tmp_path: Path) -> None:
    root = synthetic.write_domain(tmp_path, TINY, seed=0)
    assert (root / synthetic.MARKER_NAME).is_file()
    tree = _parse_tree(root)
    train, query, gallery = (tree[s] for s in synthetic.SPLIT_DIRS)
    train_pids = {pid for pid, _ in train}
    test_pids = {pid for pid, _ in query}
    assert len(train_pids) == TINY.num_train_ids
    assert len(test_pids) == TINY.num_test_ids
    assert not train_pids & test_pids
    assert 0 not in train_pids | test_pids
    assert sum(pid == 0 for pid, _ in gallery) == TINY.num_distractors
    assert {pid for pid, _ in gallery} == test_pids | {0}
    assert len(train) == TINY.num_train_ids * TINY.images_per_id
    assert len(query) + len(gallery) == TINY.num_test_ids * TINY.images_per_id + TINY.num_distractors
    cameras = {cam for _, cam in train + query + gallery}
    assert cameras <= set(range(1, TINY.num_cameras + 1))
    # Query: exactly one image per (test id, camera), each with a gallery match in another camera.
    assert len(query) == len(set(query))
    gallery_cams: dict[int, set[int]] = defaultdict(set)
    for pid, cam in gallery:
        gallery_cams[pid].add(cam)
    for pid, cam in query:
        assert gallery_cams[pid] - {cam}, f"query pid {pid} cam {cam} has no cross-camera gallery match"
    # Every image name is unique across splits (frame numbers are unique per camera).
    names = [p.name for p in root.rglob("*.jpg")]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("images_per_id", [3, 4, 12])
def test_every_query_has_a_cross_camera_match_and_every_test_id_a_query(images_per_id: int) -> None:
    # Property check over many seeds on the plan alone (no pixels): the edge cases are identities whose
    # cameras each hold a single image, or one camera holding all but one image.
    config = dataclasses.replace(TINY, images_per_id=images_per_id, num_cameras=4)
    for seed in range(20):
        plan = synthetic.plan_domain(config, seed)
        cams = plan.views.camid
        query, gallery = plan.splits == 1, plan.splits == 2
        for i in np.flatnonzero(query):
            same_pid = gallery & (plan.pids == plan.pids[i])
            assert (same_pid & (cams != cams[i])).any(), f"seed {seed}: query {i} has no valid match"
        assert len(set(plan.pids[query].tolist())) == config.num_test_ids


def test_market_loader_reads_the_tree(tmp_path: Path) -> None:
    datasets = pytest.importorskip("dualref.data.datasets")
    root = synthetic.write_domain(tmp_path, TINY, seed=0)
    splits = datasets.load_dataset("market1501", root)
    assert len(splits.train) == TINY.num_train_ids * TINY.images_per_id
    assert len({s.pid for s in splits.query}) == TINY.num_test_ids
    assert {s.camid for s in splits.train + splits.query + splits.gallery} <= set(range(TINY.num_cameras))


def test_existing_complete_tree_is_reused_and_stale_tree_replaced(tmp_path: Path) -> None:
    root = synthetic.write_domain(tmp_path, TINY, seed=0)
    some_file = next((root / "query").iterdir())
    stamp = some_file.stat().st_mtime_ns
    assert synthetic.write_domain(tmp_path, TINY, seed=0) == root
    assert some_file.stat().st_mtime_ns == stamp  # same seed and config: nothing rewritten
    # A tree of an older generator (its marker differs) is regenerated.
    (root / synthetic.MARKER_NAME).write_text('{"generator_version": 0}\n')
    (root / "query" / "junk.txt").write_text("stale")
    synthetic.write_domain(tmp_path, TINY, seed=0)
    assert not (root / "query" / "junk.txt").exists()
    assert (root / synthetic.MARKER_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folders left


def test_a_folder_the_generator_did_not_write_is_never_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 13 row 6: `dualref data synth DIR` used to delete a DIR/synth_a it had not made.
    mine = tmp_path / "synth_a"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own data")
    with pytest.raises(ValueError, match=r"synth_a exists and was not written by `dualref data synth`"):
        synthetic.write_domain(tmp_path, dataclasses.replace(TINY, name="synth_a"), seed=0)
    assert cli.main(["data", "synth", str(tmp_path)]) == 2
    assert "holds no SYNTHETIC.json" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "my own data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_a"]  # synth_b not written either


def test_crash_leaves_no_tree_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    # Patch the module whose globals write_domain reads (the package only re-exports).
    real = synthetic.writing._render_rows

    def failing(plan: synthetic.DomainPlan, rows: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("simulated crash")
        return real(plan, rows)

    monkeypatch.setattr(synthetic.writing, "_RENDER_CHUNK", 16)
    monkeypatch.setattr(synthetic.writing, "_render_rows", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthetic.write_domain(tmp_path, TINY, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_write_domain_pair_names_and_camera_counts(tmp_path: Path) -> None:
    source, target = synthetic.write_domain_pair(tmp_path, seed=0, scale=0.03)
    assert (source.name, target.name) == ("synth_a", "synth_b")
    for root, config in (
        (source, synthetic.domain_a_config(0.03)),
        (target, synthetic.domain_b_config(0.03)),
    ):
        tree = _parse_tree(root)
        assert len({pid for pid, _ in tree["bounding_box_train"]}) == config.num_train_ids
        assert {cam for entries in tree.values() for _, cam in entries} <= set(
            range(1, config.num_cameras + 1)
        )
    assert synthetic.domain_a_config().num_cameras != synthetic.domain_b_config().num_cameras


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_cameras"):
        SyntheticConfig(num_cameras=10)
    with pytest.raises(ValueError, match="images_per_id"):
        SyntheticConfig(images_per_id=2)
    with pytest.raises(ValueError, match="scale"):
        synthetic.domain_a_config(0.0)


def _controlled_render(view: int, **traits: object) -> np.ndarray:
    """One identity seen from ``view`` by a neutral camera, with no clutter, occluder, blur or noise."""
    config = dataclasses.replace(TINY, height=128, width=64)
    plan = synthetic.plan_domain(config, seed=0)
    identities = dataclasses.replace(
        plan.identities,
        **{k: np.repeat(np.asarray(v)[None], len(plan.identities.bag), 0) for k, v in traits.items()},
    )
    n = len(plan.cameras.gain)
    cameras = dataclasses.replace(
        plan.cameras,
        gain=np.ones((n, 3), np.float32),
        brightness=np.ones(n, np.float32),
        contrast=np.ones(n, np.float32),
        gradient=np.zeros(n, np.float32),
        blur_sigma=np.zeros(n, np.float32),
    )
    rows = np.array([0])
    views = synthetic._subset(plan.views, rows)
    views = dataclasses.replace(
        views,
        view=np.array([view]),
        occluder=np.array([0]),
        clutter=np.zeros_like(views.clutter),
        shift=np.zeros_like(views.shift),
        exposure=np.ones(1, np.float32),
    )
    style = dataclasses.replace(config.style, noise_std=0.0, downsample=1)
    return synthetic.render_images(identities, cameras, views, height=128, width=64, style=style)[0]


def _count_magenta(image: np.ndarray) -> int:
    # Shading scales brightness by at most 25%, so pure magenta stays R, B >> G.
    r, g, b = (image[..., c].astype(int) for c in range(3))
    return int(((r - g > 120) & (b - g > 120)).sum())


MAGENTA = np.array([1.0, 0.0, 1.0], np.float32)
PLAIN = {
    "backpack": 0,
    "bag": 0,
    "logo": 0,
    "pattern": 0,
    "upper": np.float32([0.2, 0.6, 0.2]),
    "upper2": np.float32([0.2, 0.6, 0.2]),
    "lower": np.float32([0.3, 0.3, 0.5]),
    "shoes": np.float32([0.1, 0.1, 0.1]),
    "hair_long": 0,
}


def test_backpack_is_big_from_behind_small_from_the_front() -> None:
    traits = {**PLAIN, "backpack": 1, "backpack_colour": MAGENTA}
    front, back, left, right = (_count_magenta(_controlled_render(v, **traits)) for v in range(4))
    assert back > 3 * front > 0  # straps only from the front
    assert left > 0 and right > 0
    assert _count_magenta(_controlled_render(1, **{**traits, "backpack": 0})) == 0


def test_logo_only_from_the_front_and_bag_in_one_profile_only() -> None:
    logo = {**PLAIN, "logo": 1, "logo_colour": MAGENTA}
    counts = [_count_magenta(_controlled_render(v, **logo)) for v in range(4)]
    assert counts[0] > 20 and counts[1:] == [0, 0, 0]
    bag = {**PLAIN, "bag": 1, "bag_side": 1, "bag_colour": MAGENTA}
    counts = [_count_magenta(_controlled_render(v, **bag)) for v in range(4)]
    assert counts[0] > 20 and counts[1] > 20
    assert (counts[2] == 0) != (counts[3] == 0)  # visible from exactly one side


def test_domains_differ_in_colour_statistics() -> None:
    small = {
        "num_train_ids": 20,
        "num_test_ids": 2,
        "num_distractors": 0,
        "images_per_id": 4,
        "height": 64,
        "width": 32,
    }
    a = synthetic.render_domain(dataclasses.replace(synthetic.domain_a_config(), **small)).images
    b = synthetic.render_domain(dataclasses.replace(synthetic.domain_b_config(), **small)).images
    a_f, b_f = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    # Measured on this seed: mean intensity A 0.47 vs B 0.36;
    # mean chroma (max - min channel) A 0.26, B 0.18.
    assert a_f.mean() - b_f.mean() > 0.07
    chroma_a = (a_f.max(-1) - a_f.min(-1)).mean()
    chroma_b = (b_f.max(-1) - b_f.min(-1)).mean()
    assert chroma_a - chroma_b > 0.05


@pytest.mark.parametrize("make_config", [synthetic.domain_a_config, synthetic.domain_b_config])
def test_raw_pixel_nearest_neighbour_is_far_from_solving_the_task(
    make_config: Callable[[], SyntheticConfig],
) -> None:
    config = dataclasses.replace(
        make_config(), num_train_ids=2, num_test_ids=40, num_distractors=20, height=64, width=32
    )
    domain = synthetic.render_domain(config, seed=0)
    x = domain.images.reshape(len(domain.images), -1).astype(np.float64) / 255
    q, g = domain.splits == 1, domain.splits == 2
    xq, xg = x[q], x[g]
    dist = (xq**2).sum(1)[:, None] + (xg**2).sum(1)[None, :] - 2 * xq @ xg.T  # squared L2
    mean_ap, rank1 = naive_map_rank1(dist, domain.pids[q], domain.pids[g], domain.camids[q], domain.camids[g])
    # Measured (seed 0): A mAP 10.3% / rank-1 18.4%, B 5.2% / 2.7%, with about 6 valid matches among
    # ~340 to ~390 gallery images per query (chance: ~2%): the camera's background, clutter and colour
    # cast dominate pixel distances. A small CNN trained on A reaches ~50% mAP on A
    # (benchmarks/bench_synthetic.py --cnn).
    assert mean_ap < 0.2
    assert rank1 < 0.4


def _clothing_key(traits: synthetic.IdentityTraits, row: int) -> bytes:
    names = synthetic.traits.CLOTHING_TRAITS
    return b"".join(np.asarray(getattr(traits, name)[row]).tobytes() for name in names)


def test_lookalike_groups_share_clothes_and_differ_in_small_traits() -> None:
    style = dataclasses.replace(TINY.style, lookalike_share=0.5, lookalike_group_size=2)
    config = dataclasses.replace(TINY, num_train_ids=12, num_test_ids=8, style=style)
    plan = synthetic.plan_domain(config, seed=3)
    traits, num_train, num_real = plan.identities, config.num_train_ids, 20
    by_clothes: dict[bytes, list[int]] = defaultdict(list)
    for row in range(num_real):
        by_clothes[_clothing_key(traits, row)].append(row)
    groups = [rows for rows in by_clothes.values() if len(rows) > 1]
    # Half of each block (12 train, 8 test identities) in pairs: 3 train pairs and 2 test pairs.
    assert sorted(len(g) for g in groups) == [2] * 5
    assert sum(g[0] < num_train for g in groups) == 3
    for group in groups:
        assert all((row < num_train) == (group[0] < num_train) for row in group)  # never across splits
        # The smaller traits are each identity's own draw: the pair differs in at least one of them.
        small = [np.asarray(getattr(traits, name)[group]) for name in ("shoes", "hair", "height", "build")]
        assert any(not np.array_equal(values[0], values[1]) for values in small)
    # Without look-alikes every identity dresses alike with nobody, and every draw of the plan is the same
    # as with them except the copied clothes: the look-alikes have a random stream of their own.
    plain = synthetic.plan_domain(dataclasses.replace(config, style=TINY.style), seed=3)
    assert len({_clothing_key(plain.identities, row) for row in range(num_real)}) == num_real
    assert np.array_equal(plain.identities.shoes, traits.shoes)
    assert np.array_equal(plain.views.camid, plan.views.camid)
    grouped_rows = [row for g in groups for row in g[1:]]
    others = np.setdiff1d(np.arange(num_real), grouped_rows)
    assert np.array_equal(plain.identities.upper[others], traits.upper[others])


def test_every_identity_can_have_lookalikes() -> None:
    # 12 train identities in groups of 5: two groups (10 identities), whatever the rounding of the share.
    style = dataclasses.replace(TINY.style, lookalike_share=1.0, lookalike_group_size=5)
    plan = synthetic.plan_domain(dataclasses.replace(TINY, num_train_ids=12, num_test_ids=3, style=style), 0)
    keys = [_clothing_key(plan.identities, row) for row in range(15)]
    assert sorted(keys.count(key) for key in set(keys[:12])) == [1, 1, 5, 5]
    assert len(set(keys[12:])) == 3  # 3 test identities: no group of 5 fits


def test_lookalike_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"lookalike_share=1\.5"):
        dataclasses.replace(TINY, style=dataclasses.replace(TINY.style, lookalike_share=1.5))
