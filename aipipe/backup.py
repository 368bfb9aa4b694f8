"""Backup and restore of a node or hub home as one verified ``.tar.gz`` (issue 15).

The archive holds ``MANIFEST.json`` first, then every file of the home under ``home/``:

* SQLite databases (found by their header, whatever their name) are copied with SQLite's online
  backup API (`sqlite3.Connection.backup`), so a store or audit log that a running daemon or
  hub is writing is captured as one consistent snapshot, committed WAL pages included; their
  ``-wal``/``-shm``/``-journal`` side files are never copied;
* every other file as it is (keys, certificates, configs, blobs), its mode kept (keys stay 0600);
* runtime files of a running hub (``serve.json``, ``serve.lock``) are left out.

The manifest lists each file's path, mode, size and sha256; `restore` checks every byte against
it before anything is written into the target home, and refuses an archive with a file the
manifest does not name, misses one it names, or whose bytes do not hash to it. The manifest is
not signed: it detects a damaged or altered file, not an archive rebuilt whole by someone who
can write one (keep archives where only operators can, and compare the archive's sha256 with
the one the source home's audit log recorded at backup time).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from aipipe.errors import ConfigError, NodeExistsError, StoreError

Kind = Literal["node", "hub"]
FORMAT = "aipipe-backup/1"
MANIFEST = "MANIFEST.json"
PREFIX = "home/"
CONFIG_FILE: dict[str, str] = {"node": "node.yaml", "hub": "hub.yaml"}
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SIDE_FILES = ("-wal", "-shm", "-journal")
_RUNTIME_FILES = frozenset({"serve.json", "serve.lock"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BackupEntry:
    """One file of the home as the manifest records it."""

    path: str
    mode: int
    size: int
    sha256: str
    sqlite: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "mode": f"{self.mode:o}",
            "size": self.size,
            "sha256": self.sha256,
            "sqlite": self.sqlite,
        }


@dataclass(frozen=True)
class BackupResult:
    """What `create_backup` wrote: the archive, its sha256 and the files in it."""

    archive: Path
    sha256: str
    kind: Kind
    files: tuple[BackupEntry, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class RestoreResult:
    """What `restore_backup` did: the home, the archive's sha256, and where an old home went."""

    home: Path
    sha256: str
    kind: Kind
    created: str
    files: int
    moved_aside: Path | None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def _skipped(rel: PurePosixPath) -> bool:
    name = rel.name
    return (len(rel.parts) == 1 and name in _RUNTIME_FILES) or name.endswith(_SIDE_FILES)


def _walk(home: Path) -> Iterator[tuple[PurePosixPath, Path]]:
    """(relative path, path) of every regular file under `home`, sorted; symlinks refused."""
    for root, dirs, files in os.walk(home):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = PurePosixPath(path.relative_to(home).as_posix())
            if path.is_symlink() or not path.is_file():
                raise ConfigError(
                    f"{path} is not a regular file (a link or device); a home holds only plain "
                    "files: move it out of the home and back up again"
                )
            yield rel, path


def _snapshot_sqlite(source: Path, target: Path) -> None:
    """Copy a live database with the online backup API (one consistent snapshot)."""
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up the database {source}: {exc}") from exc


def _stage(path: Path, copy: Path) -> tuple[Path, int, bool] | None:
    """A stable copy of `path` to hash and archive (a database through the online backup API,
    any other file read once), its mode, and whether it is a database; None if it vanished."""
    copy.unlink(missing_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if _is_sqlite(path):
            _snapshot_sqlite(path, copy)
            return copy, mode, True
        shutil.copyfile(path, copy)
    except FileNotFoundError:
        return None
    return copy, mode, False


def _add_file(tar: tarfile.TarFile, name: str, path: Path, mode: int) -> None:
    info = tar.gettarinfo(str(path), arcname=name)
    info.mode, info.uid, info.gid, info.uname, info.gname = mode, 0, 0, "", ""
    with path.open("rb") as handle:
        tar.addfile(info, handle)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    info.mtime = int(datetime.now(UTC).timestamp())
    tar.addfile(info, io.BytesIO(data))


def detect_kind(home: Path) -> Kind:
    for kind, config in CONFIG_FILE.items():
        if (home / config).is_file():
            return kind  # type: ignore[return-value]
    raise ConfigError(f"no node or hub home at {home} (no node.yaml or hub.yaml)")


def create_backup(home: Path, out: Path, *, kind: Kind) -> BackupResult:
    """Write `home` into the archive `out` (mode 0600; replaced only once it is complete)."""
    if detect_kind(home) != kind:
        raise ConfigError(f"{home} is not a {kind} home (no {CONFIG_FILE[kind]})")
    home_abs, out_abs = home.resolve(), out.resolve()
    if out_abs.is_relative_to(home_abs):
        raise ConfigError(f"--out {out} is inside the home {home}; write the archive elsewhere")
    entries: list[BackupEntry] = []
    skipped: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".aipipe-backup-", dir=out.parent) as tmp:
        members_tar = Path(tmp) / "members.tar"
        with tarfile.open(members_tar, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel, path in _walk(home):
                if _skipped(rel):
                    skipped.append(str(rel))
                    continue
                staged = _stage(path, Path(tmp) / "file")
                if staged is None:  # gone since the walk (a temporary file)
                    skipped.append(str(rel))
                    continue
                source, mode, sqlite = staged
                entry = BackupEntry(
                    str(rel), mode, source.stat().st_size, file_sha256(source), sqlite
                )
                _add_file(tar, PREFIX + entry.path, source, mode)
                entries.append(entry)
        manifest = _manifest(home, kind, entries)
        partial = Path(tmp) / "archive.tar.gz"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as out_tar,
        ):
            _add_bytes(out_tar, MANIFEST, manifest)
            with tarfile.open(members_tar, "r") as members:
                for member in members.getmembers():
                    out_tar.addfile(member, members.extractfile(member))
        os.replace(partial, out)
    return BackupResult(out, file_sha256(out), kind, tuple(entries), tuple(skipped))


def _manifest(home: Path, kind: Kind, entries: list[BackupEntry]) -> bytes:
    body = {
        "format": FORMAT,
        "kind": kind,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(home.resolve()),
        "home_mode": f"{stat.S_IMODE(home.stat().st_mode):o}",
        "files": [entry.to_dict() for entry in entries],
    }
    return json.dumps(body, indent=1, sort_keys=True).encode("utf-8")


# -- restore -------------------------------------------------------------------------------------


def _damaged(archive: Path, what: str) -> StoreError:
    return StoreError(
        f"backup archive {archive} is damaged or was altered: {what}; restore refused and "
        "nothing was written. Use another copy of the backup"
    )


def _read_manifest(archive: Path, tar: tarfile.TarFile) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise _damaged(archive, f"its first member is not {MANIFEST}")
    handle = tar.extractfile(first)
    if handle is None:
        raise _damaged(archive, f"{MANIFEST} cannot be read")
    try:
        manifest: dict[str, Any] = json.loads(handle.read())
    except ValueError as exc:
        raise _damaged(archive, f"{MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(archive, f"{MANIFEST} is not an {FORMAT} manifest")
    return manifest


def _safe_rel(archive: Path, name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise _damaged(archive, f"it names the unsafe path {name!r}")
    return rel


def _copy_checked(archive: Path, handle: IO[bytes], target: Path, expected: dict[str, Any]) -> None:
    digest, size = hashlib.sha256(), 0
    mode = int(str(expected["mode"]), 8) & 0o777
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected["sha256"] or size != expected["size"]:
        raise _damaged(
            archive,
            f"{expected['path']} has sha256 {digest.hexdigest()[:16]}… ({size} bytes), the "
            f"manifest says {str(expected['sha256'])[:16]}… ({expected['size']} bytes)",
        )
    os.chmod(target, mode)


def _extract_verified(archive: Path, staging: Path) -> dict[str, Any]:
    """Every file of `archive` into `staging`, each checked against the manifest."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            manifest = _read_manifest(archive, tar)
            expected = {str(f["path"]): f for f in manifest.get("files", [])}
            seen: set[str] = set()
            while (member := tar.next()) is not None:
                if not member.name.startswith(PREFIX):
                    raise _damaged(archive, f"it holds {member.name!r}, outside {PREFIX}")
                name = member.name.removeprefix(PREFIX)
                if name not in expected or name in seen or not member.isfile():
                    raise _damaged(archive, f"it holds {name!r}, which the manifest does not list")
                handle = tar.extractfile(member)
                if handle is None:
                    raise _damaged(archive, f"{name} cannot be read")
                _copy_checked(archive, handle, staging / _safe_rel(archive, name), expected[name])
                seen.add(name)
    except (tarfile.TarError, EOFError, OSError, KeyError, ValueError, TypeError) as exc:
        raise _damaged(archive, f"it cannot be read ({exc})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise _damaged(archive, f"it lacks {', '.join(missing[:5])}, which the manifest lists")
    return manifest


def _is_empty(home: Path) -> bool:
    return not home.exists() or (home.is_dir() and not any(home.iterdir()))


def _move_aside(home: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    aside = home.with_name(f"{home.name}.before-restore-{stamp}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = home.with_name(f"{home.name}.before-restore-{stamp}-{suffix}")
    home.rename(aside)
    return aside


def restore_backup(archive: Path, home: Path, *, kind: Kind, force: bool = False) -> RestoreResult:
    """Restore `archive` into `home`, verified before anything lands there.

    A non-empty `home` is refused unless `force`, which moves it aside (``<home>.before-restore-
    <time>``, never deleted)."""
    if not archive.is_file():
        raise ConfigError(f"no backup archive at {archive}")
    if not _is_empty(home) and not force:
        raise NodeExistsError(
            f"{home} is not empty; restore into a new path, or pass --force to move the "
            "existing home aside first"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.restore-", dir=home.parent))
    try:
        manifest = _extract_verified(archive, staging)
        if manifest.get("kind") != kind:
            raise ConfigError(
                f"{archive} is a backup of a {manifest.get('kind')} home, not a {kind} home; "
                f"restore it with: aipipe {manifest.get('kind')} restore"
            )
        staging.chmod(0o700)
        moved = None
        if home.exists():
            moved = _move_aside(home) if force and not _is_empty(home) else None
            if moved is None:
                home.rmdir()
        staging.rename(home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RestoreResult(
        home,
        file_sha256(archive),
        kind,
        str(manifest.get("created", "")),
        len(manifest.get("files", [])),
        moved,
    )
