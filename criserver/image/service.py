"""The image subsystem's composition root: pulls, lookups, removal, garbage collection,
imports and disk usage, over the content store, the snapshots and the image records (kept in
criserver/store/images.py, in the daemon's database).

The daemon builds one `ImageService`, `await start()`s it and hands it to the CRI ImageService
table (`criserver/image/servicer.py`); the containers code uses `get()` and `snapshot_path()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from criserver.config import ImageConfig
from criserver.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    out_of_space,
)
from criserver.failpoints import crash_point
from criserver.flight import SingleFlight
from criserver.image import manifest as mf
from criserver.image import osboot, reference
from criserver.image.auth import Credentials
from criserver.image.content import ContentStore
from criserver.image.osboot import OsImage
from criserver.image.pull import Puller, Resolved
from criserver.image.registry import Progress, RegistryClient
from criserver.image.snapshot import SnapshotStore
from criserver.image.unpack import Limits
from criserver.store.db import Database
from criserver.store.images import ImageRecord, ImageStore, LayerRecord

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FsUsage:
    path: Path
    used_bytes: int
    inodes_used: int


def _never_in_use(image_id: str) -> bool:
    return False


class ImageService:
    """Everything about images on this node. Use `await start()` before anything else."""

    def __init__(
        self,
        config: ImageConfig,
        root: Path,
        db: Database,
        in_use: Callable[[str], bool] = _never_in_use,
        pinned_images: Sequence[str] = (),
        platform: mf.Platform | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """`root` is the daemon's --root (content goes to `<root>/image`); `in_use(image_id)`
        tells whether containers still use an image; `pinned_images` are references or ids
        reported as pinned (kubelet never garbage-collects them)."""
        self.config = config
        self.dir = root / "image"
        self.in_use = in_use
        self.content = ContentStore(self.dir)
        self.snapshots = SnapshotStore(self.dir, Limits(
            config.max_layer_bytes, config.max_layer_entries, config.allow_device_nodes))
        self.records = ImageStore(db)
        self.client = RegistryClient(config, session)
        # Blobs and image ids an in-flight pull or import holds: garbage collection skips them.
        self._leases: Counter[str] = Counter()
        self.puller = Puller(self.client, self.content, platform or mf.Platform(),
                             config.max_concurrent_downloads, self._lease)
        self._pinned = [p for p in pinned_images if p]
        self._pulls: SingleFlight[str] = SingleFlight()
        self._storing = 0  # pulls and imports in flight: their blobs are not leased yet
        self._os_pulls: SingleFlight[OsImage] = SingleFlight()
        # OS image records are read, changed and saved (users, tags): one change at a time.
        self._os_lock = asyncio.Lock()

    async def start(self) -> None:
        """Load records and clean what a crash left: temp files, and the blobs and snapshot
        of a pull or import that died before its record was saved (nothing is in flight yet,
        so whatever no record names is such a leftover)."""
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        await self.content.start()
        await self.snapshots.start()
        await self.records.load()
        await self._sweep()

    async def close(self) -> None:
        await self.client.close()

    # -- queries ---------------------------------------------------------------------------

    def get(self, text: str) -> ImageRecord | None:
        """The image named by id, tag or digest reference, or None.

        :raises InvalidArgument: `text` is neither an id nor a valid reference.
        """
        record = self._lookup(text)
        # OS images are the machines': CRI callers (and kubelet's image GC) never see them.
        return None if record is None or osboot.is_os_record(record) else record

    def _lookup(self, text: str) -> ImageRecord | None:
        image_id = reference.parse_image_id(text)
        if image_id is not None:
            record = self.records.visible(image_id)
            if record is not None:
                return record
        try:
            ref = reference.parse(text)
        except InvalidArgument:
            if image_id is not None:
                return None  # an id nothing has: not an invalid reference
            raise
        if ref.digest:
            return self.records.with_digest(ref.with_digest(ref.digest))
        return self.records.tagged(ref.tagged)

    def get_by_id(self, image_id: str) -> ImageRecord | None:
        """By exact id, including images removed while still in use by containers."""
        return self.records.by_id(image_id)

    def images(self, filter_text: str = "") -> list[ImageRecord]:
        """Visible images, oldest first; with a filter, the one image it names (or none)."""
        if filter_text:
            record = self.get(filter_text)
            return [record] if record is not None else []
        return sorted((r for r in self.records.all() if not osboot.is_os_record(r)),
                      key=lambda r: r.created_ns)

    def snapshot_path(self, image_id: str) -> Path:
        """The read-only EROFS root filesystem of `image_id` (exists once pulled)."""
        return self.snapshots.path(image_id)

    @property
    def snapshots_dir(self) -> Path:
        """Where every `snapshot_path` is (the micro-VM backend shares it with its guests)."""
        return self.snapshots.dir

    def is_pinned(self, record: ImageRecord) -> bool:
        for text in self._pinned:
            if reference.parse_image_id(text) == record.id:
                return True
            try:
                ref = reference.parse(text)
            except InvalidArgument:
                continue
            if ref.tagged in record.repo_tags or (
                ref.digest and ref.with_digest(ref.digest) in record.repo_digests
            ):
                return True
        return False

    # -- pull ------------------------------------------------------------------------------

    async def pull(
        self,
        image: str,
        auth: Credentials | Any = None,
        progress: Progress | None = None,
    ) -> str:
        """Pull `image` (a reference) and return its image id, "sha256:<config digest>".

        `auth` is Credentials or a CRI AuthConfig. `progress(digest, done, total)` is called
        as layers download. Concurrent pulls of one reference share a single pull.
        """
        ref = reference.parse(image)
        creds = auth if isinstance(auth, Credentials) or auth is None \
            else Credentials.from_auth_config(auth)
        return await self._pulls.run(str(ref), lambda: self._pull(ref, creds, progress))

    async def _pull(self, ref: reference.Reference, creds: Credentials | None,
                    progress: Progress | None) -> str:
        started = time.monotonic()
        log.info("image pull started image=%s", ref)
        async with self._storing_content(f"image {ref}"):
            resolved = await self.puller.fetch(ref, creds, progress)
            image_id = resolved.manifest.config.digest
            tags = [ref.tagged] if ref.tagged else []
            digests = [ref.with_digest(resolved.index_digest or resolved.manifest_digest)]
            await self._register(image_id, resolved, tags, digests)
        log.info("image pulled image=%s image_id=%s bytes=%d seconds=%.2f", ref, image_id,
                 resolved.content_size, time.monotonic() - started)
        return image_id

    async def _register(self, image_id: str, resolved: Resolved, tags: list[str],
                        digests: list[str]) -> ImageRecord:
        """Build the snapshot, then create or update the record (tags and digests merged)."""
        layers = [
            LayerRecord(d.digest, d.size, d.media_type, diff_id)
            for d, diff_id in zip(resolved.manifest.layers, resolved.config.diff_ids, strict=True)
        ]
        with self._lease({image_id, *(layer.digest for layer in layers)}):
            await self.snapshots.ensure(image_id, [
                (self.content.path(layer.digest), mf.LAYER_TYPES[layer.media_type],
                 layer.diff_id, f"{image_id}/{layer.digest}")
                for layer in layers
            ])
            crash_point("image.snapshot_built")  # a pull's or import's snapshot, no record
            uid, username = mf.uid_or_username(resolved.config.user)
            old = self.records.by_id(image_id)
            if old is not None and not old.removed:
                tags = _merge(old.repo_tags, tags)
                digests = _merge(old.repo_digests, digests)
            record = ImageRecord(
                id=image_id, repo_tags=tags, repo_digests=digests,
                size=resolved.content_size, manifest_digest=resolved.manifest_digest,
                index_digest=resolved.index_digest, layers=layers,
                config=resolved.config.as_dict(), uid=uid, username=username,
                created_ns=old.created_ns if old else time.time_ns(),
            )
            for other in await self.records.save(record):
                log.info("tag moved away image_id=%s tags=%s", other.id, other.repo_tags)
        return record

    # -- OS images (IRI machines) ---------------------------------------------------------

    async def pull_os_image(
        self,
        image: str,
        auth: Credentials | Any = None,
        progress: Progress | None = None,
        user: str | None = None,
    ) -> OsImage:
        """Pull the IronCore OS image `image` names (see criserver/image/osboot.py). Blobs
        already present are not fetched again; concurrent pulls of one reference share one
        pull; a digest reference already pulled needs no registry at all. With `user` (a
        machine id) the image is marked in use by it as `use_os_image` does, so that no
        removal slips in between the pull and the mark.

        :raises InvalidArgument: not an OS image, or one refused (sizes, media types).
        :raises NotFound, FailedPrecondition, Unavailable, Internal: as `pull`.
        """
        ref = reference.parse(image)
        creds = auth if isinstance(auth, Credentials) or auth is None \
            else Credentials.from_auth_config(auth)
        os_image = await self._pull_os_once(ref, creds, progress)
        if user is not None:
            try:
                await self.use_os_image(os_image.id, user)
            except NotFound:
                log.info("os image removed while pulled, pulling again image=%s", ref)
                os_image = await self._pull_os_once(ref, creds, progress)
                await self.use_os_image(os_image.id, user)
        return os_image

    async def _pull_os_once(self, ref: reference.Reference, creds: Credentials | None,
                            progress: Progress | None) -> OsImage:
        if ref.digest:
            local = self.get_os_image(str(ref))
            record = self.records.by_id(local.id) if local is not None else None
            # Blobs gone from under the record (a damaged store) are fetched again.
            if local is not None and record is not None and all(
                    self.content.has(layer.digest, layer.size) for layer in record.layers):
                return local
        return await self._os_pulls.run(str(ref), lambda: self._pull_os(ref, creds, progress))

    async def _pull_os(self, ref: reference.Reference, creds: Credentials | None,
                       progress: Progress | None) -> OsImage:
        started = time.monotonic()
        log.info("os image pull started image=%s", ref)
        resolved = await osboot.fetch(self.puller, ref, creds, self.config.max_layer_bytes,
                                      progress)
        image_id = resolved.manifest_digest
        tags = [ref.tagged] if ref.tagged else []
        digests = [ref.with_digest(resolved.index_digest or resolved.manifest_digest)]
        async with self._os_lock:
            old = self.records.by_id(image_id)
            if old is not None and not osboot.is_os_record(old):
                raise FailedPrecondition(f"image {ref}: {image_id} is a container image")
            users: list[str] = []
            if old is not None:
                tags, digests = _merge(old.repo_tags, tags), _merge(old.repo_digests, digests)
                users = list(old.extra.get("users", []))
            record = osboot.record_of(resolved, tags, digests,
                                      old.created_ns if old else time.time_ns(), users)
            with self._lease(record.blobs):
                for other in await self.records.save(record):
                    log.info("tag moved away image_id=%s tags=%s", other.id, other.repo_tags)
        log.info("os image pulled image=%s image_id=%s bytes=%d seconds=%.2f", ref, image_id,
                 resolved.content_size, time.monotonic() - started)
        return osboot.os_image_of(record, ref, self.content.path)

    def get_os_image(self, text: str) -> OsImage | None:
        """The OS image pulled before that `text` (id, tag or digest reference) names, without
        asking any registry, or None.

        :raises InvalidArgument: `text` is neither an id nor a valid reference.
        """
        record = self._lookup(text)
        if record is None or not osboot.is_os_record(record):
            return None
        image_id = reference.parse_image_id(text)
        if image_id == record.id:
            # By id: name it by the first reference it was pulled as.
            names = record.repo_digests or record.repo_tags
            ref = reference.parse(names[0]) if names else None
            if ref is None:
                return None
        else:
            ref = reference.parse(text)
        return osboot.os_image_of(record, ref, self.content.path)

    def os_images(self) -> list[ImageRecord]:
        """The OS image records, oldest first (the admin's view; CRI never lists them)."""
        return sorted((r for r in self.records.all() if osboot.is_os_record(r)),
                      key=lambda r: r.created_ns)

    def os_image_users(self, image_id: str) -> list[str]:
        """Who uses this OS image (machine ids, as `use_os_image` was told)."""
        record = self.records.by_id(image_id)
        return list(record.extra.get("users", [])) if record is not None else []

    async def use_os_image(self, image_id: str, user: str) -> None:
        """Mark OS image `image_id` in use by `user` (a machine id), durably: while any user
        holds it, `remove_os_image` refuses and its blobs stay. Idempotent.

        :raises NotFound: no such OS image (pull it first).
        """
        async with self._os_lock:
            record = self.records.by_id(image_id)
            if record is None or not osboot.is_os_record(record):
                raise NotFound(f"os image {image_id} not found")
            users = list(record.extra.get("users", []))
            if user not in users:
                await self.records.save(replace(record, extra={**record.extra,
                                                               "users": [*users, user]}))

    async def release_os_image(self, image_id: str, user: str) -> None:
        """`user` no longer uses the OS image. Idempotent; an unknown image is no error. The
        image stays until removed (`remove_os_image`): the next machine may want it."""
        async with self._os_lock:
            record = self.records.by_id(image_id)
            if record is None or not osboot.is_os_record(record):
                return
            users = list(record.extra.get("users", []))
            if user in users:
                users.remove(user)
                await self.records.save(replace(record, extra={**record.extra, "users": users}))

    async def remove_os_image(self, text: str) -> None:
        """Remove the OS image `text` names and its content. Missing images are no error.

        :raises FailedPrecondition: machines use it (they are named).
        """
        async with self._os_lock:
            record = self._lookup(text)
            if record is None or not osboot.is_os_record(record):
                return
            users = record.extra.get("users", [])
            if users:
                raise FailedPrecondition(
                    f"os image {text} is in use by machines {', '.join(users)}")
            await self.records.delete(record.id)
        log.info("os image removed image_id=%s", record.id)
        await self.gc()

    # -- removal and garbage collection ----------------------------------------------------

    async def remove(self, text: str) -> None:
        """Remove the image `text` names, with all its tags. Missing images are no error.
        Content of an image still used by containers stays until it is unused."""
        record = self.get(text)
        if record is None:
            return
        if self.in_use(record.id):
            # A new record, as the store holds only what it has written.
            await self.records.save(replace(record, removed=True, repo_tags=[], repo_digests=[]))
            log.info("image removed, content kept while in use image_id=%s", record.id)
        else:
            await self.records.delete(record.id)
            log.info("image removed image_id=%s", record.id)
        await self.gc()

    async def gc(self) -> None:
        """Delete records removed earlier whose containers are gone, then every blob and
        snapshot no record references. Safe to call any time (e.g. after containers exit)."""
        for record in self.records.all(include_removed=True):
            if record.removed and not self.in_use(record.id):
                await self.records.delete(record.id)
        await self._sweep()

    async def _sweep(self) -> None:
        """Delete every blob and snapshot no record (nor an in-flight pull) references."""
        keep_blobs: set[str] = set(self._leases)
        keep_images: set[str] = set(self._leases)
        for record in self.records.all(include_removed=True):
            keep_blobs |= record.blobs
            keep_images.add(record.id)
        unused_blobs = self.content.digests() - keep_blobs
        built = await asyncio.to_thread(self.snapshots.image_ids)
        unused_snapshots = {i for i in built - keep_images if not self.in_use(i)}
        freed = await self.content.delete(unused_blobs)
        await self.snapshots.remove(unused_snapshots)
        if unused_blobs or unused_snapshots:
            log.info("image gc blobs=%d blob_bytes=%d snapshots=%d",
                     len(unused_blobs), freed, len(unused_snapshots))

    @asynccontextmanager
    async def _storing_content(self, what: str) -> AsyncIterator[None]:
        """Around a pull or an import: a full store is RESOURCE_EXHAUSTED naming it (not an
        internal error, nor a corrupt layer), and a failed one leaves none of its blobs or
        snapshot behind. Those are leased only once complete, so the sweep waits for the
        last pull or import in flight (what it leaves, the next one or the next start takes)."""
        self._storing += 1
        try:
            yield
        except BaseException as exc:
            self._storing -= 1
            if self._storing == 0:
                try:
                    await asyncio.shield(self._sweep())
                except Exception:
                    log.exception("removing what a failed pull stored failed (retried later)")
            if out_of_space(exc):
                assert isinstance(exc, OSError)
                log.warning("image store full what=%s dir=%s error=%s", what, self.dir, exc)
                raise ResourceExhausted(
                    f"{what}: no space left on device in the image store {self.dir} "
                    f"({exc.strerror}: {exc.filename or ''}); free space on it and pull again"
                ) from exc
            raise
        self._storing -= 1

    @contextmanager
    def _lease(self, keys: set[str]) -> Iterator[None]:
        self._leases.update(keys)
        try:
            yield
        finally:
            self._leases.subtract(keys)
            self._leases += Counter()  # drop zero counts

    # -- import ----------------------------------------------------------------------------

    async def import_layout(self, path: Path, name: str | None = None) -> list[str]:
        """Import every image of an OCI image-layout directory or .tar archive (air-gapped
        nodes); returns their image ids. Names come from the layout's annotations
        (`io.containerd.image.name`, or `org.opencontainers.image.ref.name` when it is a full
        reference), else `name` if given."""
        from criserver.image.layout import read_layout

        ids = []
        async with self._storing_content(f"import of {path}"), \
                read_layout(path, self.puller.platform) as layout:
            for entry in layout.images:
                tag_text = entry.name or name
                digest_of = entry.top_digest
                with self._lease(set(entry.blobs)):
                    resolved = await layout.copy_into(entry, self.content, self.puller.platform)
                    crash_point("import.content_stored")  # every blob, no snapshot or record
                    tags: list[str] = []
                    digests: list[str] = []
                    if tag_text:
                        ref = reference.parse(tag_text)
                        tags = [ref.tagged] if ref.tagged else []
                        digests = [ref.with_digest(digest_of)]
                    image_id = resolved.manifest.config.digest
                    await self._register(image_id, resolved, tags, digests)
                log.info("image imported path=%s image_id=%s tags=%s", path, image_id, tags)
                ids.append(image_id)
        if not ids:
            raise NotFound(f"{path}: the image layout lists no images")
        return ids

    # -- disk usage ------------------------------------------------------------------------

    async def fs_usage(self, path: Path | None = None) -> FsUsage:
        """Bytes and inodes used under `path` (default: the image filesystem, <root>/image)."""
        target = path or self.dir
        used, inodes = await asyncio.to_thread(_du, target)
        return FsUsage(target, used, inodes)


def _merge(old: list[str], new: list[str]) -> list[str]:
    return list(dict.fromkeys([*old, *new]))


def _du(path: Path) -> tuple[int, int]:
    used = inodes = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(path)]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        used += st.st_blocks * 512
        inodes += 1
        if os.path.isdir(current) and not os.path.islink(current):
            try:
                stack.extend(os.path.join(current, n) for n in os.listdir(current))
            except (FileNotFoundError, NotADirectoryError):
                continue
    return used, inodes
