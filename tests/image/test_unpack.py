"""Layer application on a real filesystem, including hostile layers: path traversal, absolute
paths, symlink and hardlink escapes, device nodes, decompression bombs, bad diff_ids."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest

from criserver.image.unpack import LayerError, Limits, apply_layer
from tests.image.oci import E, compress, sha, tar_bytes

LIMITS = Limits(max_bytes=64 * 1024 * 1024, max_entries=10_000, allow_devices=False)


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(snapshot root, a host directory outside it holding a file hostile layers aim at)."""
    root = tmp_path / "snap" / "rootfs"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    return root, outside


def apply(root: Path, entries: list[E], compression: str = "", limits: Limits = LIMITS,
          diff_id: str | None = None) -> None:
    data = tar_bytes(entries)
    blob = root.parent / f"layer-{len(os.listdir(root.parent))}"
    blob.write_bytes(compress(data, compression))
    apply_layer(root, blob, compression, diff_id or sha(data), limits, "test-layer")


def untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "host file"
    assert (outside / "secret").stat().st_nlink == 1


def test_dotdot_and_absolute_names_stay_inside(box: tuple[Path, Path]) -> None:
    root, outside = box
    apply(root, [E("../../outside/dotdot", data=b"1"), E("/abs/file", data=b"2"),
                 E("a/../../../../x", data=b"3")])
    untouched(outside)
    assert (root / "outside/dotdot").read_bytes() == b"1"
    assert (root / "abs/file").read_bytes() == b"2"
    assert (root / "x").read_bytes() == b"3"


def test_write_through_symlink_is_rerooted(box: tuple[Path, Path]) -> None:
    root, outside = box
    apply(root, [E("evil", "sym", link=str(outside)), E("evil/pwned", data=b"abs"),
                 E("rel", "sym", link="../../../../../.."), E("rel/pwned2", data=b"rel")])
    apply(root, [E("evil/secret", data=b"overwrite?"), E("evil/.wh.secret")])
    untouched(outside)
    assert (root / str(outside).lstrip("/") / "pwned").read_bytes() == b"abs"
    assert (root / "pwned2").read_bytes() == b"rel"
    assert os.readlink(root / "evil") == str(outside)


def test_file_replacing_a_symlink_does_not_write_through(box: tuple[Path, Path]) -> None:
    root, outside = box
    apply(root, [E("link", "sym", link=str(outside / "secret"))])
    apply(root, [E("link", data=b"replaced", mode=0o600)])
    untouched(outside)
    assert not (root / "link").is_symlink()
    assert (root / "link").read_bytes() == b"replaced"


def test_hardlink_escapes_are_refused(box: tuple[Path, Path]) -> None:
    root, outside = box
    with pytest.raises(LayerError, match="hardlink"):
        apply(root, [E("hl", "link", link="../../outside/secret")])
    with pytest.raises(LayerError, match="hardlink"):
        apply(root, [E("evil", "sym", link=str(outside)), E("hl2", "link", link="evil/secret")])
    untouched(outside)


def test_hardlink_inside_the_layer(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply(root, [E("a/file", data=b"x"), E("b/same", "link", link="a/file")])
    assert (root / "a/file").stat().st_ino == (root / "b/same").stat().st_ino


def test_device_nodes_skipped_unless_allowed(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply(root, [E("dev/null", "chr"), E("dev/fifo", "fifo")])
    assert not (root / "dev/null").exists()
    assert stat.S_ISFIFO((root / "dev/fifo").lstat().st_mode)
    allowed = Limits(LIMITS.max_bytes, LIMITS.max_entries, allow_devices=True)
    apply(root, [E("dev/null", "chr")], limits=allowed)
    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1


def test_decompression_bomb_is_stopped(box: tuple[Path, Path]) -> None:
    root, _ = box
    bomb = [E("zeros", data=bytes(20 * 1024 * 1024))]
    assert len(gzip.compress(tar_bytes(bomb))) < 100_000
    small = Limits(max_bytes=4 * 1024 * 1024, max_entries=100, allow_devices=False)
    with pytest.raises(LayerError, match="max_layer_bytes"):
        apply(root, bomb, "gzip", small)
    with pytest.raises(LayerError, match="max_layer_entries"):
        apply(root, [E(f"f{i}", data=b"") for i in range(101)], "zstd", small)


def test_diff_id_mismatch_is_an_error(box: tuple[Path, Path]) -> None:
    root, _ = box
    with pytest.raises(LayerError, match="diff_id"):
        apply(root, [E("f", data=b"x")], "gzip", diff_id=sha(b"something else"))


def test_corrupt_layer_is_an_error(box: tuple[Path, Path]) -> None:
    root, _ = box
    blob = root.parent / "corrupt"
    blob.write_bytes(gzip.compress(b"not a tar at all" * 100)[:200])
    with pytest.raises(LayerError, match="corrupt"):
        apply_layer(root, blob, "gzip", sha(b""), LIMITS, "test-layer")


def test_whiteouts_opaque_and_same_layer_entries(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply(root, [E("d/old1", data=b"1"), E("d/sub/old2", data=b"2"), E("keep", data=b"k"),
                 E("gone", data=b"g"), E("gonedir/x", data=b"x")])
    # A new file listed before the opaque marker in the same layer must survive it.
    apply(root, [E("d", "dir", mode=0o711), E("d/new", data=b"n"), E("d/.wh..wh..opq"),
                 E(".wh.gone"), E(".wh.gonedir"), E("d/sub/.wh.absent")], "gzip")
    assert sorted(os.listdir(root / "d")) == ["new"]
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o711
    assert sorted(os.listdir(root)) == ["d", "keep"]


def test_metadata_is_kept(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply(root, [E("dir", "dir", mode=0o750, uid=7, gid=8, mtime=1_500_000_000),
                 E("dir/f", data=b"x", mode=0o2640, uid=1000, gid=1001, mtime=1_400_000_000,
                   xattrs={"user.note": "hi", "trusted.overlay.opaque": "y"}),
                 E("dir/l", "sym", link="f", mtime=1_300_000_000)])
    f = (root / "dir/f").stat()
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid) == (0o2640, 1000, 1001)
    assert int(f.st_mtime) == 1_400_000_000
    assert int((root / "dir/l").lstat().st_mtime) == 1_300_000_000
    d = (root / "dir").stat()
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, int(d.st_mtime)) == \
        (0o750, 7, 8, 1_500_000_000)
    assert os.getxattr(root / "dir/f", "user.note") == b"hi"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "dir/f")


def test_bogus_whiteouts_remove_nothing_above(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply(root, [E("a/b/f", data=b"f")])
    apply(root, [E("a/b/.wh..."), E("a/b/.wh.."), E("a/b/.wh.")])
    assert (root / "a/b/f").read_bytes() == b"f"


def test_symlink_loop_is_refused(box: tuple[Path, Path]) -> None:
    root, _ = box
    with pytest.raises(LayerError, match="symlinks"):
        apply(root, [E("a", "sym", link="b"), E("b", "sym", link="a"), E("a/f", data=b"")])
