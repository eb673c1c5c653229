"""Batch summarization: one JSON line per document, resumable, exactly one `ok` line per document.

The job plans its work without the model (walk the sources, keep this worker's shard, hash every
document, drop those already done), then loads the model once and summarizes the rest, shortest
first. Every outcome is appended to the result store (sacli.jobs) before the next document starts,
so an interrupted job loses at most the document in progress. docs/SUMMARIZE.md describes the
record format and the decisions behind it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

from sacli import __version__
from sacli.config import Settings
from sacli.errors import InputError, ModelError, SacliError, UsageError
from sacli.inputs import Document, collect_documents
from sacli.jobs import ERROR, OK, Key, Record, ResultStore, Shard, in_family, sibling_ok_keys

DEFAULT_PROMPT = "Summarize this document in a few sentences: its subject, its main points and its conclusion."

# A NUL byte in the first 8 KiB marks a binary file (the same test `sacli ask` applies).
_SNIFF_BYTES = 8192

Notify = Callable[[str], None]


class GenerationLike(Protocol):
    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    sparsity: float
    attention: str


class Engine(Protocol):
    """What the job needs from sacli.app.Session (tests pass a fake)."""

    def answer(self, documents: list[Document], question: str, *, on_text: Any = None) -> GenerationLike: ...


EngineFactory = Callable[[Settings, Notify], Engine]


@dataclass(frozen=True)
class JobOptions:
    prompt: str = DEFAULT_PROMPT
    # one record per directory (its files together) instead of one per file
    per_dir: bool = False
    hidden: bool = False
    use_gitignore: bool = True
    # print tracebacks of unexpected per-document failures
    verbose: bool = False


@dataclass
class JobReport:
    output: Path
    shard: Shard
    # documents (or directories) of this worker's shard
    planned: int = 0
    # already had an ok line (here or in a sibling file)
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    # wall time of the summarizing loop, model loading included
    elapsed_s: float = 0.0
    # documents already done in the other files of the family: a merge is needed to see them in one file
    done_elsewhere: int = 0

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def docs_per_min(self) -> float:
        return 60.0 * self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Prompt plus generated tokens of the documents summarized, per second of the loop."""
        return (self.prompt_tokens + self.new_tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        data["shard"] = self.shard.label
        data["docs_per_min"] = round(self.docs_per_min, 3)
        data["tokens_per_s"] = round(self.tokens_per_s, 1)
        return data

    def summary_line(self) -> str:
        parts = [f"{self.ok} ok", f"{self.failed} failed", f"{self.skipped} already done"]
        noun = "document" if self.planned == 1 else "documents"
        line = f"summarize: {self.planned} {noun} ({', '.join(parts)})"
        if self.processed:
            line += (
                f"; {self.docs_per_min:.1f} documents/min, {self.tokens_per_s:.0f} tokens/s"
                f" over {self.elapsed_s:.1f} s"
            )
        return f"{line} -> {self.output}"


# ----------------------------------------------------------------------------------- fingerprint


def fingerprint(settings: Settings, options: JobOptions) -> tuple[dict[str, Any], str]:
    """The settings that change a summary, and their short hash (the `settings_id` of records).

    Device, directory-walk options and the shard are left out: they do not change the text. With
    `dense` the SampleAttention knobs are left out too, since they do not apply.
    """
    values: dict[str, Any] = {
        "model": settings.model.strip(),
        "dtype": settings.dtype,
        "prompt": options.prompt,
        "system": settings.system,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "rope_scale": settings.rope_scale,
        "dense": settings.dense,
        "unit": "dir" if options.per_dir else "file",
    }
    if not settings.dense:
        values.update(
            alpha=settings.alpha,
            window=settings.window,
            sample_ratio=settings.sample_ratio,
            dense_below=settings.dense_below,
            rule=settings.rule,
        )
        if settings.rule == "segments":
            values["sampled_levels"] = settings.sampled_levels
        if settings.chunk:
            values["chunk"] = settings.chunk
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return values, hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# -------------------------------------------------------------------------------------- planning


@dataclass
class WorkItem:
    """One record to produce: a file, or a directory's files with --per-dir."""

    path: str
    files: list[str]
    size: int = 0
    sha256: str = ""

    @property
    def key_path(self) -> str:
        return self.path

    @property
    def single(self) -> bool:
        """A file record (its sha256 is the file's own), not a directory record."""
        return self.files == [self.path]


def read_path_list(stream: IO[bytes], *, nul: bool) -> list[str]:
    """Paths from `find`-style output: one per line, or NUL-separated (find -print0) with `nul`.

    Blank entries are ignored; with newlines a trailing carriage return is dropped (Windows lists).
    Bytes that are not UTF-8 are kept as surrogate escapes, as os.fsdecode does.
    """
    data = stream.read()
    raw = data.split(b"\0") if nul else data.split(b"\n")
    paths = []
    for entry in raw:
        if not nul:
            entry = entry.rstrip(b"\r")
        if entry.strip():
            paths.append(os.fsdecode(entry))
    return paths


def expand_sources(sources: Sequence[str], options: JobOptions, notify: Notify) -> list[str]:
    """Files to summarize, in order, each once.

    A file named explicitly is always a document, even when binary (it then gets an error record);
    directories are walked as `sacli ask` walks them (.gitignore, hidden files, binary and empty
    files skipped with a note). A missing source is a usage error: nothing has run yet.
    """
    if not sources:
        raise UsageError("no documents given: pass files or directories, or --from-stdin")
    missing = [s for s in sources if not os.path.lexists(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UsageError(f"no such file or directory: {missing[0]}{more}")
    files: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(os.path.normpath(path))

    for source in sources:
        if source == "-":
            raise UsageError("summarize reads files, not stdin; use --from-stdin to read a list of paths")
        if not os.path.isdir(source) and not os.path.isfile(source):
            raise UsageError(f"{source} is neither a regular file nor a directory")
        if os.path.isdir(source):
            notes: list[str] = []
            try:
                documents = collect_documents(
                    [source], hidden=options.hidden, use_gitignore=options.use_gitignore, notify=notes.append
                )
            except InputError as exc:
                notify(f"note: {exc}")
                continue
            # The walk warns that non-UTF-8 text will be read with replacement characters; here
            # such a file gets an error record instead (see _check_text), so that warning is dropped.
            lossy = tuple(f"warning: {d.path}: not valid UTF-8" for d in documents if d.lossy)
            for note in notes:
                if not (lossy and note.startswith(lossy)):
                    notify(note)
            for document in documents:
                add(document.path)
        else:
            add(source)
    return files


def plan_items(files: Sequence[str], per_dir: bool) -> list[WorkItem]:
    if not per_dir:
        return [WorkItem(path=f, files=[f]) for f in files]
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(os.path.dirname(f) or ".", []).append(f)
    return [WorkItem(path=d, files=sorted(fs)) for d, fs in groups.items()]


def _hash_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _combine(named_digests: Iterable[tuple[str, str]]) -> str:
    """Digest of a directory record: its files' names and contents, in name order."""
    digest = hashlib.sha256()
    for name, sha in sorted(named_digests):
        digest.update(os.path.basename(name).encode("utf-8", "surrogateescape") + b"\0" + sha.encode() + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ documents


def _check_text(data: bytes, path: str) -> None:
    """Raise InputError for content that is not UTF-8 text.

    Unlike `sacli ask`, a batch job does not summarize text decoded with replacement characters:
    nobody reads a warning scrolling past in an unattended job, so the record says why instead.
    """
    if not data.strip():
        raise InputError(f"{path} is empty")
    if b"\0" in data[:_SNIFF_BYTES]:
        raise InputError(f"{path} is a binary file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not valid UTF-8 text (first bad byte at offset {exc.start}); convert it, e.g. with iconv"
        ) from None


def _memory_document(path: str, data: bytes) -> Document:
    # The model reads exactly the bytes that were hashed, even if the file changes meanwhile.
    return Document(path=path, size=len(data), _open=lambda: io.BytesIO(data))


def load_item(item: WorkItem) -> tuple[str, list[Document]]:
    """(sha256, documents) of an item, read now; InputError when a file is unreadable or not text."""
    documents: list[Document] = []
    digests: list[tuple[str, str]] = []
    for path in item.files:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        _check_text(data, path)
        digests.append((path, hashlib.sha256(data).hexdigest()))
        documents.append(_memory_document(path, data))
    sha = digests[0][1] if item.single else _combine(digests)
    return sha, documents


def item_digest(item: WorkItem) -> tuple[str, int]:
    """(sha256, bytes) as `load_item` would compute them, without checking or keeping the text."""
    if item.single:
        return _hash_file(item.path)
    digests, size = [], 0
    for path in item.files:
        sha, n = _hash_file(path)
        digests.append((path, sha))
        size += n
    return _combine(digests), size


# ---------------------------------------------------------------------------------------- records


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Context:
    settings_values: dict[str, Any]
    settings_id: str
    model: str
    shard: Shard
    unit: str
    max_new_tokens: int

    def base(self, item: WorkItem, sha: str) -> Record:
        record: Record = {
            "path": item.path,
            "sha256": sha,
            "settings_id": self.settings_id,
            "status": OK,
        }
        if self.unit == "dir":
            record["files"] = list(item.files)
        return record

    def finish(self, record: Record, elapsed_ms: float) -> Record:
        record.update(
            model=self.model,
            settings=self.settings_values,
            shard=self.shard.label,
            elapsed_ms=round(elapsed_ms, 3),
            sacli_version=__version__,
            timestamp=_now(),
        )
        return record


def ok_record(
    ctx: _Context, item: WorkItem, sha: str, result: GenerationLike, elapsed_ms: float, engine: Any
) -> Record:
    record = ctx.base(item, sha)
    record.update(
        tokens=int(result.prompt_tokens),
        new_tokens=int(result.new_tokens),
        # the summary was cut by max_new_tokens rather than ended by the model
        stopped_at_limit=int(result.new_tokens) >= ctx.max_new_tokens,
        ttft_ms=round(float(result.ttft_ms), 3),
        sparsity=round(float(result.sparsity), 6),
        attention=result.attention,
        summary=result.text,
    )
    loaded = getattr(engine, "lm", None)
    if loaded is not None:
        # with --rope-scale yarn the context (and so the RoPE factor) depends on the longest
        # prompt the loaded model was sized for; it is recorded so the output can be traced
        record.update(context_limit=int(loaded.context_limit), rope_scaled=bool(loaded.rope_scaled))
    return ctx.finish(record, elapsed_ms)


def error_record(ctx: _Context, item: WorkItem, sha: str, exc: BaseException, elapsed_ms: float) -> Record:
    record = ctx.base(item, sha)
    kind = "OutOfMemory" if _is_out_of_memory(exc) else type(exc).__name__
    message = _first_line(exc)
    if kind == "OutOfMemory" and "out of memory" not in message.lower():
        message = f"out of memory: {message}"
    record.update(status=ERROR, error_type=kind, error=message, summary=None)
    return ctx.finish(record, elapsed_ms)


# ---------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class JobProgress:
    """Where the summarizing loop stands; sent before the first document and after each one."""

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    tokens_per_s: float


ProgressCallback = Callable[[JobProgress], None]


# --------------------------------------------------------------------------------------------- job


def _once(notify: Notify) -> Notify:
    """Pass each distinct message on once: per-document notes repeat for every document of a job."""
    seen: set[str] = set()

    def say(message: str) -> None:
        if message not in seen:
            seen.add(message)
            notify(message)

    return say


def _default_engine(settings: Settings, notify: Notify) -> Engine:
    from sacli.app import Session

    return Session(settings, notify)


def run_job(
    sources: Sequence[str],
    out: Path,
    settings: Settings,
    options: JobOptions,
    *,
    shard: Shard,
    notify: Notify,
    progress: ProgressCallback | None = None,
    engine_factory: EngineFactory | None = None,
) -> JobReport:
    """Summarize this shard's part of `sources` into `shard.output_path(out)`.

    Documents with an ok line for the same (path, sha256, settings) are skipped. Per-document
    failures become error lines; a UsageError or ModelError (the job itself cannot run) propagates.
    """
    engine_factory = engine_factory or _default_engine
    if not options.prompt.strip():
        raise UsageError("--prompt must not be empty")
    own = shard.output_path(out)
    settings_values, settings_id = fingerprint(settings, options)
    ctx = _Context(
        settings_values,
        settings_id,
        settings.model.strip(),
        shard,
        "dir" if options.per_dir else "file",
        settings.max_new_tokens,
    )

    files = [f for f in expand_sources(sources, options, notify) if not in_family(out, f)]
    if not files:
        raise InputError("no text files to summarize in the given sources")
    items = [it for it in plan_items(files, options.per_dir) if shard.owns(it.key_path)]
    report = JobReport(output=own, shard=shard, planned=len(items))

    with ResultStore(own, notify) as store:
        done_here = set(store.ok_keys)
        done_elsewhere = sibling_ok_keys(out, own, notify) - done_here
        done = done_here | done_elsewhere

        todo: list[WorkItem] = []
        for item in items:
            try:
                item.sha256, item.size = item_digest(item)
            except OSError as exc:
                # unreadable now: try again at processing time, where the failure gets its record
                item.sha256, item.size = "", 0
                notify(f"warning: cannot read {item.path}: {exc.strerror or exc}")
            key = (item.key_path, item.sha256, settings_id)
            if key in done:
                report.skipped += 1
                report.done_elsewhere += key in done_elsewhere
            else:
                todo.append(item)
        # Shortest first: the most documents are banked early, and similar lengths run together.
        todo.sort(key=lambda it: (it.size, it.path))

        if report.skipped:
            notify(f"summarize: {report.skipped} of {len(items)} documents already done; {len(todo)} to go")
        bytes_total, bytes_done = sum(it.size for it in todo), 0
        if progress is not None:
            progress(JobProgress(0, len(todo), 0, bytes_total, 0.0))
        engine: Engine | None = None
        start = time.perf_counter()
        for number, item in enumerate(todo, start=1):
            engine = _process(item, ctx, store, done, report, engine, engine_factory, settings, options, notify)
            report.elapsed_s = time.perf_counter() - start
            bytes_done += item.size
            if progress is not None:
                progress(JobProgress(number, len(todo), bytes_done, bytes_total, report.tokens_per_s))
    return report


def _process(
    item: WorkItem,
    ctx: _Context,
    store: ResultStore,
    done: set[Key],
    report: JobReport,
    engine: Engine | None,
    engine_factory: EngineFactory,
    settings: Settings,
    options: JobOptions,
    notify: Notify,
) -> Engine | None:
    """Summarize one item and append its record; returns the engine (created on first need)."""
    t0 = time.perf_counter()
    sha = item.sha256
    try:
        sha, documents = load_item(item)
        if (item.key_path, sha, ctx.settings_id) in done:
            # changed since planning into content that is already summarized
            report.skipped += 1
            return engine
        if engine is None:
            engine = engine_factory(settings, _once(notify))
        result = engine.answer(documents, options.prompt)
    except (UsageError, ModelError):
        raise  # the job cannot run at all: stop rather than fail every document alike
    except Exception as exc:  # noqa: BLE001 - one document's failure is its record, not the job's end
        if _is_out_of_memory(exc):
            _release_memory()
        elif not isinstance(exc, SacliError) and options.verbose:
            notify("".join(traceback.format_exception(exc)).rstrip())
        record = error_record(ctx, item, sha, exc, (time.perf_counter() - t0) * 1e3)
        store.append(record)
        report.failed += 1
        message = record["error"]
        notify(f"error: {message}" if message.startswith(item.path) else f"error: {item.path}: {message}")
        return engine
    record = ok_record(ctx, item, sha, result, (time.perf_counter() - t0) * 1e3, engine)
    store.append(record)
    done.add((item.key_path, sha, ctx.settings_id))
    report.ok += 1
    report.prompt_tokens += record["tokens"]
    report.new_tokens += record["new_tokens"]
    return engine


def rank_device(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Under torchrun each local rank gets its own GPU when the device is left on "auto".

    Without this every rank on a node would load its model onto the first GPU.
    """
    local = environ.get("LOCAL_RANK")
    if settings.device != "auto" or local is None or not local.strip().isdigit():
        return settings
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return settings
    return dataclasses.replace(settings, device=f"cuda:{int(local) % count}")
