"""Tests for tlkit.data.index: the cached, header-checked image index."""

from __future__ import annotations

import csv
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit.data import index
from tlkit.data.index import PathList, check_files, header_problem
from tlkit.data.sources import ImageDataset, load_source


def _jpeg(path: Path, size: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _folder(root: Path, per_class: int = 4) -> Path:
    for c in ("a", "b"):
        for i in range(per_class):
            _jpeg(root / c / f"{i}.jpg", seed=10 * ord(c) + i)
    return root


def _never(path: str) -> str | None:
    raise AssertionError(f"full decode of {path}: the header should have sufficed")


def _check(paths, tmp_path: Path, full_check=_never) -> index.IndexReport:
    return check_files(
        [str(p) for p in paths], key="k", full_check=full_check, max_pixels=10**8, index_dir=tmp_path / "idx"
    )


def test_path_list_is_a_compact_sequence_of_the_same_paths() -> None:
    paths = ["/data/a/1.jpg", "/data/é/2.png", os.fsdecode(b"/data/\xff.jpg")]  # a non-UTF-8 name round-trips
    listed = PathList.from_strings(paths)
    assert list(listed) == paths and listed[1] == paths[1] and listed[-1] == paths[-1] and len(listed) == 3
    assert listed.take([2, 0]) == [paths[2], paths[0]] and listed[1:] == paths[1:]
    assert listed + ["x"] == [*paths, "x"] and listed.blob.dtype == np.uint8
    assert PathList.concat([listed, listed.take([0])]) == [*paths, paths[0]] and list(listed.take([])) == []
    assert list(PathList.from_strings([])) == [] and len(PathList.from_strings([])) == 0
    with pytest.raises(IndexError, match="out of range"):
        listed[3]


def test_intact_jpeg_and_png_are_judged_from_their_headers(tmp_path: Path) -> None:
    jpg = _jpeg(tmp_path / "a.jpg")
    png = tmp_path / "b.png"
    Image.open(jpg).save(png)
    assert header_problem(str(jpg), None, _never) is None and header_problem(str(png), None, _never) is None


@pytest.mark.parametrize("cut", [10, 200])
def test_truncated_files_are_caught_at_the_scan(tmp_path: Path, cut: int) -> None:
    jpg, png = _jpeg(tmp_path / "a.jpg"), tmp_path / "b.png"
    Image.open(jpg).save(png)
    for path in (jpg, png):
        path.write_bytes(path.read_bytes()[:-cut])
    bad = dict(_check([jpg, png], tmp_path, full_check=lambda p: "decoded in full: broken").bad)
    assert bad == {str(jpg): "decoded in full: broken", str(png): "decoded in full: broken"}


def test_data_after_the_end_marker_is_decoded_in_full_and_kept(tmp_path: Path) -> None:
    jpg = _jpeg(tmp_path / "camera.jpg")
    jpg.write_bytes(jpg.read_bytes() + b"vendor trailer")  # some cameras append data after the end-of-image marker
    decoded = []
    report = _check([jpg], tmp_path, full_check=lambda p: decoded.append(p))  # a full decode finds nothing wrong
    assert report.bad == [] and decoded == [str(jpg)]


def test_second_run_checks_nothing_and_a_changed_or_new_file_is_rechecked(tmp_path: Path) -> None:
    paths = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(5)]
    first = _check(paths, tmp_path)
    assert first.checked == 5 and first.bad == [] and first.cache_file.is_file()
    assert _check(paths, tmp_path).checked == 0
    paths[2].write_bytes(paths[2].read_bytes()[:-100])  # changed (size and mtime): damaged
    new = _jpeg(tmp_path / "new.jpg", seed=9)
    again = _check([*paths, new], tmp_path, full_check=lambda p: "truncated")
    assert again.checked == 2 and again.bad == [(str(paths[2]), "truncated")]
    assert _check([*paths, new], tmp_path, full_check=_never).bad == [(str(paths[2]), "truncated")]  # cached


def test_a_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    paths = [_jpeg(tmp_path / "0.jpg")]
    report = _check(paths, tmp_path)
    report.cache_file.write_bytes(b"not an index")
    with pytest.warns(UserWarning, match="unreadable .*rebuilding"):
        assert _check(paths, tmp_path).checked == 1


def _load_in_child(root: str, queue) -> None:
    import time

    from tlkit.data import sources

    real_check = index.header_problem
    index.header_problem = lambda *args: (time.sleep(0.05), real_check(*args))[1]  # so that the two overlap
    checked = []
    real = sources.check_files

    def spy(*args, **kwargs):
        report = real(*args, **kwargs)
        checked.append(report.checked)
        return report

    sources.check_files = spy
    sources.load_source(f"folder:{root}", val_split=0.25)
    queue.put(checked[0])


def test_processes_sharing_the_cache_build_the_index_once(tmp_path: Path) -> None:
    """Two processes (as two DDP ranks of one node) start together: one checks every file, the other waits for it
    and checks none."""
    root = _folder(tmp_path / "data", per_class=6)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_load_in_child, args=(str(root), queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert all(child.exitcode == 0 for child in children)
    assert sorted(queue.get(timeout=5) for _ in children) == [0, 12]


def test_file_damaged_inside_passes_the_scan_and_is_listed_by_the_loader(tmp_path: Path) -> None:
    """A JPEG with a bogus marker inside its entropy-coded data, header and end marker intact: the scan keeps it, the
    loader replaces it and lists it in skipped_files.csv (never a crash, never a silent drop)."""
    root = _folder(tmp_path / "data")
    victim = root / "a" / "1.jpg"
    data = bytearray(victim.read_bytes())
    start = data.index(b"\xff\xda")  # start of scan: the entropy-coded data follows
    data[start + 30 : start + 32] = b"\xff\xc4"  # a Huffman-table marker where none may be
    victim.write_bytes(bytes(data))
    source = load_source(f"folder:{root}", val_split=0.25)
    assert source.skipped == []
    split = source.train if str(victim) in list(source.train.samples) else source.val
    log = tmp_path / "skipped_files.csv"
    position = list(split.samples).index(str(victim))
    with pytest.warns(UserWarning, match="Skipped .*1.jpg in the loader"):
        image, target = ImageDataset(split, skipped_log=log)[position]
    assert image.shape == (3, 48, 48) and target == split.targets[(position + 1) % len(split)]
    rows = list(csv.DictReader(open(log)))
    assert rows[0]["path"] == str(victim) and "unreadable when loaded" in rows[0]["reason"]


def _stats_of_images(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ``os.stat`` of a ``.jpg`` file from now on."""
    seen: list[str] = []
    real = os.stat

    def stat(path, *args, **kwargs):
        if str(path).endswith(".jpg"):
            seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    return seen


def test_second_run_of_a_folder_stats_only_the_files_not_known_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing proves a folder's files exist; one cached as usable is not ``stat``ed again (the loader decodes it
    in full anyway). An unusable one is, so that a mended file is used again, and a new one is checked."""
    root = _folder(tmp_path / "data")
    broken = root / "b" / "9.jpg"
    broken.write_bytes(b"not a jpeg")
    first = load_source(f"folder:{root}", val_split=0.25)
    assert [path for path, _ in first.skipped] == [str(broken)]
    stats = _stats_of_images(monkeypatch)
    again = load_source(f"folder:{root}", val_split=0.25)
    assert stats == [str(broken)] and again.skipped == first.skipped
    assert list(again.train.samples) == list(first.train.samples) and list(again.val.samples) == list(first.val.samples)
    _jpeg(broken, seed=99)  # mended in place
    new = _jpeg(root / "a" / "new.jpg", seed=98)
    stats.clear()
    mended = load_source(f"folder:{root}", val_split=0.25)
    assert sorted(stats) == sorted([str(broken), str(new)]) and mended.skipped == []
    assert {str(broken), str(new)} <= {*mended.train.samples, *mended.val.samples}
    new.unlink()
    stats.clear()
    removed = load_source(f"folder:{root}", val_split=0.25)
    assert stats == [] and str(new) not in {*removed.train.samples, *removed.val.samples}


def test_usable_file_damaged_in_place_after_the_index_is_listed_by_the_loader(tmp_path: Path) -> None:
    """Truncated in place after the first run (same name: the listing cannot tell): the second run keeps its cached
    verdict, and the loader, which decodes it in full, replaces it and lists it, as any file damaged inside."""
    root = _folder(tmp_path / "data")
    load_source(f"folder:{root}", val_split=0.25)
    victim = root / "a" / "2.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    source = load_source(f"folder:{root}", val_split=0.25)
    assert source.skipped == []
    split = source.train if str(victim) in list(source.train.samples) else source.val
    log = tmp_path / "skipped_files.csv"
    with pytest.warns(UserWarning, match="Skipped .*2.jpg in the loader"):
        images = [ImageDataset(split, skipped_log=log)[i][0] for i in range(len(split))]
    assert all(image.shape == (3, 48, 48) for image in images)
    assert [row["path"] for row in csv.DictReader(open(log))] == [str(victim)]


def test_files_of_a_csv_are_all_stated_and_one_damaged_in_place_is_caught_by_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No listing vouches for a CSV's files: each is ``stat``ed on every run, so a file changed since is checked."""
    root = _folder(tmp_path / "data")
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"data/{c}/{i}.jpg,{c}\n" for c in "ab" for i in range(4)))
    load_source(f"csv:{table}", val_split=0.25)
    victim = root / "b" / "3.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    stats = _stats_of_images(monkeypatch)
    source = load_source(f"csv:{table}", val_split=0.25)
    assert len(stats) >= 8 and [path for path, _ in source.skipped] == [str(victim)]


def test_symlinked_image_whose_target_is_gone_is_listed_by_the_second_run(tmp_path: Path) -> None:
    """A folder of links into a store (a dataset "view"): the listing shows a link, not its target, so links are
    ``stat``ed on every run; a target removed after the first run is named by the scan, and a class whose targets all
    went is an error there, not a class the loader silently fills with other images."""
    store = _folder(tmp_path / "store")
    view = tmp_path / "view"
    for image in sorted(store.rglob("*.jpg")):
        (view / image.parent.name).mkdir(parents=True, exist_ok=True)
        (view / image.parent.name / image.name).symlink_to(image)
    assert load_source(f"folder:{view}", val_split=0.25).skipped == []
    (store / "a" / "1.jpg").unlink()
    again = load_source(f"folder:{view}", val_split=0.25)
    assert [path for path, _ in again.skipped] == [str(view / "a" / "1.jpg")]
    assert "symlink" in again.skipped[0][1]
    for image in (store / "b").glob("*.jpg"):
        image.unlink()
    with pytest.raises(ValueError, match="Class 'b' has no readable training image"):
        load_source(f"folder:{view}", val_split=0.25)


def test_a_file_mended_with_its_size_and_mtime_put_back_is_checked_again(tmp_path: Path) -> None:
    """chmod a+r mends a file unreadable for its permissions without changing its size or mtime (and touch -r puts an
    mtime back): keyed by size and mtime, the file stayed "unusable" from the cache."""
    paths = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(3)]
    good = paths[1].read_bytes()
    paths[1].write_bytes(b"\x00" * len(good))  # damaged, same size
    damaged = paths[1].stat()
    assert _check(paths, tmp_path, full_check=lambda p: "unreadable").bad == [(str(paths[1]), "unreadable")]
    time.sleep(0.05)  # past the file system's clock tick, as a later chmod would be
    paths[1].write_bytes(good)
    os.utime(paths[1], ns=(damaged.st_atime_ns, damaged.st_mtime_ns))  # size and mtime as when it was unusable
    again = _check(paths, tmp_path)
    assert again.checked == 1 and again.bad == []


def test_a_cache_dir_that_is_a_file_warns_and_checks_every_file(tmp_path: Path) -> None:
    paths = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(2)]
    (tmp_path / "not_a_folder").write_text("")
    with pytest.warns(UserWarning, match="cannot use the cache|could not write"):
        report = check_files(
            [str(p) for p in paths], key="k", full_check=_never, max_pixels=10**8,
            index_dir=tmp_path / "not_a_folder" / "index",
        )  # fmt: skip
    assert report.checked == 2 and report.bad == []
