"""Template keys and the store's bookkeeping (no VM: the e2e tests restore real clones)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criserver.errors import Internal
from criserver.vm.qemu import (
    DirectKernel,
    Disk,
    GuestMemory,
    SerialTransport,
    Share,
    TapNic,
    VMSpec,
)
from criserver.vm.template import (
    TEMPLATE_MAC,
    Template,
    TemplateStore,
    shape_of,
    template_key,
)


def pod_spec(pod: str, **kw: object) -> VMSpec:
    state = Path(f"/run/c/{pod}")
    base: dict[str, object] = {
        "vm_id": pod,
        "state_dir": state,
        "boot": DirectKernel(Path("/a/vmlinux"), Path("/a/initramfs.cpio"), "quiet"),
        "disks": (Disk("root", Path("/a/root.erofs"), "criserver-root"),),
        "transport": SerialTransport(state / "agent.sock"),
        "nics": (TapNic(fd=9, mac=f"02:00:00:00:00:{len(pod):02x}"),),
        "shares": (Share("criserver.images", Path("/var/lib/images")),
                   Share("criserver.shared", Path(f"/run/c/volumes/{pod}"), read_only=False)),
        "free_page_reporting": True,
    }
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def test_pods_of_one_shape_share_a_key() -> None:
    a, b = pod_spec("a"), pod_spec("bb")
    assert template_key(a) == template_key(b)
    assert shape_of(a).free_page_reporting is False
    assert shape_of(a).nics == (TapNic(-1, TEMPLATE_MAC),)


@pytest.mark.parametrize("change", [
    {"memory_mib": 512}, {"vcpus": 2}, {"nics": ()},
    {"boot": DirectKernel(Path("/b/vmlinux"), Path("/a/initramfs.cpio"), "quiet")},
    {"boot": DirectKernel(Path("/a/vmlinux"), Path("/a/initramfs.cpio"), "quiet x=1")},
    {"tcg_tb_size_mib": 48},
    {"shares": (Share("criserver.images", Path("/var/lib/images")),)},
])
def test_what_the_guest_sees_changes_the_key(change: dict[str, object]) -> None:
    assert template_key(pod_spec("a")) != template_key(pod_spec("a", **change))


def test_clone_spec_restores_privately() -> None:
    clone = Template(Path("/t/k")).clone_spec(pod_spec("a"))
    assert clone.memory_file == GuestMemory(Path("/t/k/memory"), shared=False)
    assert clone.incoming and not clone.free_page_reporting
    assert [n.mac for n in clone.nics] == [TEMPLATE_MAC] and clone.nics[0].fd == 9


def built(root: Path, spec: VMSpec) -> Template:
    template = Template(root / template_key(spec))
    template.directory.mkdir(parents=True)
    template.memory.write_bytes(b"")
    template.state.write_bytes(b"state")
    return template


@contextlib.asynccontextmanager
async def no_nics(name: str, count: int) -> AsyncIterator[tuple[TapNic, ...]]:
    yield ()


class NoGuest:
    def template_spec(self, spec: VMSpec) -> VMSpec:
        return spec

    async def wait_ready(self, spec: VMSpec, deadline: float) -> None:
        return None


def test_ready_and_prune(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path, NoGuest(), no_nics)
    spec = pod_spec("a")
    assert store.ready(spec) is None
    template = built(tmp_path, spec)
    assert store.ready(spec) == template
    (tmp_path / "half.tmp").mkdir()  # a build a crash cut short
    # ... after its save: the state file is there, but it was never published.
    (tmp_path / "saved.tmp").mkdir()
    (tmp_path / "saved.tmp" / "state").write_bytes(b"QEVM")
    store.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [template.directory.name]
    store.discard(template)
    assert store.ready(spec) is None and not template.directory.exists()


class RecordingStore(TemplateStore):
    """Builds by writing the files, so the bookkeeping runs without QEMU."""

    def __init__(self, root: Path, fail: bool = False, **kw: object) -> None:
        super().__init__(root, NoGuest(), no_nics, **kw)  # type: ignore[arg-type]
        self.builds: list[str] = []
        self.fail = fail

    async def build(self, spec: VMSpec, key: str) -> Template:
        self.builds.append(key)
        await asyncio.sleep(0)
        if self.fail:
            raise Internal("the template guest did not come up")
        return built(self.root, spec)


async def test_ensure_builds_once_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, max_templates=2)
    specs = [pod_spec("a", memory_mib=m) for m in (256, 320, 384)]
    store.ensure(specs[0])
    store.ensure(specs[0])
    await store.wait_built()
    store.ensure(specs[0])  # built: nothing to do
    assert len(store.builds) == 1
    store.ensure(specs[1])
    await store.wait_built()
    first = store.ready(specs[0])  # used last: kept
    assert first is not None
    store.ensure(specs[2])
    await store.wait_built()
    assert store.ready(specs[1]) is None
    assert store.ready(specs[0]) == first and store.ready(specs[2]) is not None


async def test_a_failed_build_is_not_retried(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, fail=True)
    spec = pod_spec("a")
    store.ensure(spec)
    await store.wait_built()
    store.ensure(spec)
    await store.wait_built()
    assert len(store.builds) == 1 and store.ready(spec) is None


def test_template_shape_keeps_share_tags_not_paths() -> None:
    shape = shape_of(pod_spec("a"))
    assert [s.tag for s in shape.shares] == ["criserver.images", "criserver.shared"]
    assert all(s.path.parts[1] == "template" for s in shape.shares)
    assert dataclasses.replace(shape, vm_id="x").transport == shape.transport
