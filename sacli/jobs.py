"""Result store for batch jobs: append-only JSON Lines files, shards, and merging them.

A result file holds one JSON object per line. A line counts once its newline is on disk: every record
is written with a single write() and fsync'd, so a crash can only leave an incomplete last line (no
trailing newline), which the next writer drops before appending. Nothing else is ever rewritten in
place; `merge` builds a new file and renames it over the old one.

A record's identity is its key (path, sha256, settings_id); a job skips every key that already has an
`ok` line in the file family (the output file and its per-shard siblings), which keeps each
key at exactly one `ok` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sacli.errors import InputError, UsageError

try:
    import fcntl
except ImportError:  # not POSIX: jobs still work, without the guard against two writers on one file
    fcntl = None  # type: ignore[assignment]

Record = dict[str, Any]
Key = tuple[str, str, str]
Notify = Callable[[str], None]

OK = "ok"
ERROR = "error"
REQUIRED_FIELDS = ("path", "sha256", "settings_id", "status")


def record_key(record: Mapping[str, Any]) -> Key:
    return (record["path"], record["sha256"], record["settings_id"])


def check_record(record: Any) -> str | None:
    """Why `record` is not a result record, or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in REQUIRED_FIELDS:
        if not isinstance(record.get(name), str):
            return f"missing or non-string field '{name}'"
    if record["status"] not in (OK, ERROR):
        return f"unknown status {record['status']!r}"
    return None


# ----------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Worker `index` of `count`: it owns the documents whose path hashes to `index`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"invalid shard {self.index}/{self.count}: need 0 <= index < count")

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, path: str) -> bool:
        return shard_of(path, self.count) == self.index

    def output_path(self, out: Path) -> Path:
        """out.jsonl for a single worker; out.rank{i}-of-{n}.jsonl for worker i of n."""
        if self.count == 1:
            return out
        return out.with_name(f"{_stem(out)}.rank{self.index}-of-{self.count}{out.suffix}")


def shard_of(path: str, count: int) -> int:
    """Stable owner of `path` among `count` workers.

    Hashing the path (not the position in a list) keeps every document on the same worker when
    documents are added or removed, and every worker computes it without talking to the others.
    """
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard must look like INDEX/COUNT (e.g. 0/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment {name} must be an integer, got {raw!r}") from None


def detect_shard(environ: Mapping[str, str], override: str | None = None) -> Shard:
    """This worker's shard: --shard, else torchrun's RANK/WORLD_SIZE and/or a Slurm job array.

    Under torchrun inside a Slurm array task both apply: array task t of T running n ranks gives
    shard t * n + rank of T * n.
    """
    if override:
        return parse_shard(override)
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    if (rank is None) != (world is None):
        raise UsageError("RANK and WORLD_SIZE must be set together")
    local = Shard(rank, world) if rank is not None and world is not None else Shard()

    task, count = _env_int(environ, "SLURM_ARRAY_TASK_ID"), _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        return local
    first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") or 0
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
    offset = task - first
    if offset < 0 or offset % step or offset // step >= count:
        raise UsageError(
            f"cannot number Slurm array task {task} (min {first}, step {step}, count {count}) "
            "as a shard; use an evenly stepped --array range or pass --shard INDEX/COUNT"
        )
    return Shard(offset // step * local.count + local.index, count * local.count)


# ----------------------------------------------------------------------------------- file family


def _stem(out: Path) -> str:
    return out.name[: -len(out.suffix)] if out.suffix else out.name


def _shard_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(_stem(out))}\.rank(\d+)-of-(\d+){re.escape(out.suffix)}")


def shard_files(out: Path) -> dict[Path, Shard]:
    """The existing per-shard files of `out` (out.rank{i}-of-{n}.jsonl), with their shard."""
    pattern = _shard_pattern(out)
    found: dict[Path, Shard] = {}
    if not out.parent.is_dir():
        return found
    for entry in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            index, count = int(match.group(1)), int(match.group(2))
            if index < count:
                found[entry] = Shard(index, count)
    return found


def in_family(out: Path, path: str) -> bool:
    """Whether `path` is `out` or one of its shard files (a job must not summarize its own output)."""
    try:
        same_dir = os.path.samefile(os.path.dirname(path) or ".", out.parent)
    except OSError:
        return False
    name = os.path.basename(path)
    return same_dir and (name == out.name or _shard_pattern(out).fullmatch(name) is not None)


def family(out: Path) -> list[Path]:
    """`out` and its shard files, those that exist."""
    files = [out] if out.is_file() else []
    return files + list(shard_files(out))


# ------------------------------------------------------------------------------------------ reading


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    # byte length of the complete lines; a torn tail starts here
    good_bytes: int = 0
    torn_bytes: int = 0
    # (line number, reason) for complete lines that are not records
    bad_lines: list[tuple[int, str]] = field(default_factory=list)


def read_records(path: Path) -> ReadResult:
    """Parse a result file without changing it. A last line without a newline is reported as torn."""
    result = ReadResult()
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                result.torn_bytes = len(line)
                break
            result.good_bytes += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                result.bad_lines.append((number, f"not JSON ({exc.msg})"))
                continue
            problem = check_record(record)
            if problem:
                result.bad_lines.append((number, problem))
            else:
                result.records.append(record)
    return result


def ok_keys(records: list[Record]) -> set[Key]:
    return {record_key(r) for r in records if r["status"] == OK}


# ------------------------------------------------------------------------------------------ locking


def _try_lock(fd: int, exclusive: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    # Makes a new or renamed directory entry durable; some platforms cannot open directories.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_locked(path: Path, flags: int) -> int:
    """Open `path` holding an exclusive lock on the file that is at `path` now.

    --merge renames a new file over the old one; a job that locked the old file after that
    would append to a file nobody reads again, so the inode is checked after locking.
    """
    for _ in range(10):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot open {path}: {exc.strerror}") from None
        if not _try_lock(fd, exclusive=True):
            os.close(fd)
            raise UsageError(f"{path} is being written by another running job")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise UsageError(f"{path} keeps being replaced while opening it")


def _check_idle(path: Path) -> None:
    """Raise when a running job holds `path` (merging a file still being written would race it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if not _try_lock(fd, exclusive=False):
            raise UsageError(f"{path} is being written by a running job; merge after it finishes")
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ writing


class ResultStore:
    """One job's output file, opened for appending whole records.

    Opening takes an exclusive lock (two jobs never append to one file), drops a torn last line
    left by a crash, and refuses a file whose complete lines are not all records: appending to a
    file we cannot read back would break resuming.
    """

    def __init__(self, path: Path, notify: Notify) -> None:
        self.path = path
        self._notify = notify
        self._fd: int | None = None
        # keys with an ok line in this file (the records themselves are not kept in memory)
        self.ok_keys: set[Key] = set()

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise UsageError(f"output directory {parent} does not exist")
        created = not self.path.exists()
        self._fd = _open_locked(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            self._load(created, parent)
        except BaseException:
            self.close()
            raise

    def _load(self, created: bool, parent: Path) -> None:
        assert self._fd is not None
        if created:
            _fsync_dir(parent)
        result = read_records(self.path)
        if result.bad_lines:
            number, reason = result.bad_lines[0]
            raise InputError(
                f"{self.path}:{number}: {reason}; this is not a sacli result file "
                "(choose another --out or move it aside)"
            )
        if result.torn_bytes:
            os.ftruncate(self._fd, result.good_bytes)
            os.fsync(self._fd)
            self._notify(
                f"{self.path}: dropped an incomplete last line ({result.torn_bytes} bytes) "
                "left by an interrupted run"
            )
        self.ok_keys = ok_keys(result.records)

    def append(self, record: Record) -> None:
        assert self._fd is not None, "ResultStore.append before open"
        problem = check_record(record)
        assert problem is None, f"refusing to write an invalid record: {problem}"
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        if record["status"] == OK:
            self.ok_keys.add(record_key(record))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None


def sibling_ok_keys(out: Path, own: Path, notify: Notify) -> set[Key]:
    """`ok` keys in the other files of `out`'s family (read only; they may be in use by other ranks).

    Consulting them lets a job rerun with a different number of workers, or after --merge, without
    redoing finished documents.
    """
    keys: set[Key] = set()
    for path in family(out):
        if path.resolve() == own.resolve():
            continue
        try:
            result = read_records(path)
        except OSError as exc:
            notify(f"cannot read {path}: {exc.strerror}; its documents may be redone")
            continue
        keys |= ok_keys(result.records)
    return keys


# ------------------------------------------------------------------------------------------ merging


@dataclass
class MergeReport:
    out: Path
    inputs: list[Path]
    ok: int = 0
    errors: int = 0
    # superseded lines dropped: error lines of keys that have an ok line, older duplicates
    dropped: int = 0
    bad_lines: int = 0
    torn: int = 0
    misplaced: int = 0


def _latest(a: Record, b: Record) -> Record:
    # ISO-8601 UTC timestamps compare as strings; on a tie the record read later wins
    return a if str(a.get("timestamp", "")) > str(b.get("timestamp", "")) else b


def merge(out: Path, notify: Notify) -> MergeReport:
    """Combine `out` and its shard files into `out`: one line per key, written atomically.

    For each key (path, sha256, settings_id): the latest `ok` line when there is one, otherwise the
    latest `error` line. Checks first that no job is writing the inputs and that, for every shard
    count found, all of its shard files exist. Shard files are left in place.
    """
    shards = shard_files(out)
    if not shards and not out.is_file():
        raise InputError(f"nothing to merge: neither {out} nor {_stem(out)}.rank*-of-*{out.suffix} exist")
    counts = sorted({s.count for s in shards.values()})
    for count in counts:
        present = {s.index for s in shards.values() if s.count == count}
        missing = [Shard(i, count).output_path(out).name for i in range(count) if i not in present]
        if missing:
            raise InputError(f"cannot merge: shard files missing: {', '.join(missing)}")
    for path in shards:
        _check_idle(path)
    # Holding `out` locked (created empty if absent) keeps a job from appending to it meanwhile.
    fd = _open_locked(out, os.O_RDWR | os.O_CREAT)
    try:
        return _merge_locked(out, shards, notify)
    finally:
        os.close(fd)


def _merge_locked(out: Path, shards: dict[Path, Shard], notify: Notify) -> MergeReport:
    inputs = [out, *shards]
    report = MergeReport(out=out, inputs=inputs)
    best: dict[Key, Record] = {}
    for path in inputs:
        result = read_records(path)
        if result.torn_bytes:
            report.torn += 1
            notify(f"{path}: ignoring an incomplete last line ({result.torn_bytes} bytes)")
        for number, reason in result.bad_lines:
            report.bad_lines += 1
            notify(f"{path}:{number}: skipped: {reason}")
        shard = shards.get(path)
        for record in result.records:
            if shard is not None and not shard.owns(record["path"]):
                report.misplaced += 1
            key = record_key(record)
            kept = best.get(key)
            if kept is None:
                best[key] = record
                continue
            report.dropped += 1
            if (kept["status"] == OK) != (record["status"] == OK):
                best[key] = kept if kept["status"] == OK else record
            else:
                best[key] = _latest(kept, record)
    if report.misplaced:
        notify(f"{report.misplaced} records sit in a shard file that does not own their path (kept)")

    merged = [best[key] for key in sorted(best)]
    for record in merged:
        if record["status"] == OK:
            report.ok += 1
        else:
            report.errors += 1
    _write_atomically(out, merged)
    return report


def _write_atomically(out: Path, records: list[Record]) -> None:
    parent = out.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for record in records:
                fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def iter_lines(path: Path) -> Iterator[Record]:
    """Records of a result file, in order (for readers and tests)."""
    yield from read_records(path).records
