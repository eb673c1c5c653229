"""Turn the SOURCE arguments of `sacli ask` into documents that can be read as a stream.

Each source is a file, a directory (walked recursively in sorted order) or `-` for stdin.

Decisions, in one place:
- Directory walks honour .gitignore files (the walked directory's, its subdirectories', and those
  of its parents up to the enclosing git repository root) with git's precedence: deeper files win,
  a negation can re-include a file, an ignored directory is not entered. `.git` is never read.
- Hidden files and directories (name starting with ".") are skipped in walks unless `hidden`.
- A file named explicitly is always used, even when hidden or ignored.
- Binary files (a NUL byte in the first 8 KiB, or bytes that are neither UTF-8 nor text-like) are
  skipped with a note; they never reach the model. Empty files are skipped with a note.
- Text that is not valid UTF-8 is decoded with U+FFFD replacing the bad bytes, and a warning names
  the file: the model still sees the readable text, and the user knows it is degraded.
- Stdin is spooled (to memory up to 1 MiB, then to a temporary file) so it can be checked and read
  more than once.
- Line ends are normalized to "\n" and a UTF-8 byte-order mark is dropped.
- Chunks end right after a single newline between two non-space characters, else right before a
  single space between two words: byte-level BPE pre-tokenizers never merge across such a point,
  so tokenizing chunk by chunk gives the same ids as tokenizing the whole text (see _cut_point).
  Text with neither in 4 chunks' worth is cut anywhere (one token boundary may differ there).
"""

from __future__ import annotations

import codecs
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Callable, Iterator

import pathspec

from sacli.errors import InputError

SNIFF_BYTES = 8192
CHUNK_BYTES = 1 << 20
STDIN_SPOOL_BYTES = 1 << 20
# Share of C0 control bytes above which a NUL-free, non-UTF-8 file is taken for binary: legacy
# 8-bit text (Latin-1, cp1252) has almost none, compressed or packed data has about 12%.
CONTROL_SHARE_BINARY = 0.05
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b\x1b")

Notify = Callable[[str], None]


def _ignore(_: str) -> None:
    return None


@dataclass(eq=False)
class Document:
    """One input text. `path` is how it is shown to the user and to the model ("<stdin>" for -)."""

    path: str
    size: int
    _open: Callable[[], BinaryIO] = field(repr=False)
    notify: Notify = field(default=_ignore, repr=False)
    # set when the text is known not to be valid UTF-8 (warned once, decoded with replacement)
    lossy: bool = False
    # bytes consumed by the read in progress (for progress bars)
    bytes_read: int = 0

    def read_chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
        """Yield the decoded text in pieces of about `chunk_bytes`, cut at safe points (see module doc).

        Line ends are normalized to "\n" (CRLF and lone CR), as Python's text mode does.
        """
        self.bytes_read = 0
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace" if self.lossy else "strict")
        pending = ""
        carry = ""  # a CR at the end of a read: it may be the first half of a CRLF
        with self._open() as fh:
            while True:
                raw = fh.read(chunk_bytes)
                final = not raw
                text = carry + self._decode(decoder, raw, final)
                self.bytes_read += len(raw)
                carry = "\r" if text.endswith("\r") and not final else ""
                pending += _newlines(text[: len(text) - len(carry)])
                if final:
                    if pending:
                        yield pending
                    return
                cut = _cut_point(pending, hard=len(pending) > 4 * chunk_bytes)
                if cut > 0:
                    yield pending[:cut]
                    pending = pending[cut:]

    def _decode(self, decoder: codecs.IncrementalDecoder, raw: bytes, final: bool) -> str:
        state = decoder.getstate()
        try:
            return decoder.decode(raw, final)
        except UnicodeDecodeError as exc:
            decoder.setstate(state)
            decoder.errors = "replace"
            if not self.lossy:
                self.lossy = True
                offset = max(self.bytes_read + exc.start - len(state[0]), 0)
                self.notify(
                    f"warning: {self.path}: not valid UTF-8 (first bad byte at offset {offset}); "
                    "undecodable bytes replaced with U+FFFD"
                )
            return decoder.decode(raw, final)


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _cut_point(text: str, *, hard: bool) -> int:
    """Index to cut `text` at so that both sides tokenize as they would together; 0 = keep reading.

    Safe points for byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen 2 patterns): right after a
    single newline between two non-space characters, else right before a single space between two
    words. A whitespace run is never split and never ends a piece: at the end of a string the
    patterns group a run differently than before a word. `text` has "\n" line ends only.
    """
    for sep, offset in (("\n", 1), (" ", 0)):
        i = text.rfind(sep, 0, len(text) - 1)
        while i > 0:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + offset
            i = text.rfind(sep, 0, i)
    return len(text) if hard else 0
def _classify(head: bytes, whole: bool) -> str:
    """'empty', 'binary', 'lossy' (text, not UTF-8) or 'text' from the first bytes of a file."""
    if not head.strip():
        return "empty" if whole else "text"
    if b"\x00" in head:
        return "binary"
    try:
        codecs.getincrementaldecoder("utf-8-sig")().decode(head, whole)
        return "text"
    except UnicodeDecodeError:
        controls = sum(1 for b in head if b < 0x20 and b not in _TEXT_CONTROLS)
        return "binary" if controls > CONTROL_SHARE_BINARY * len(head) else "lossy"


class _Collector:
    def __init__(self, *, hidden: bool, use_gitignore: bool, notify: Notify) -> None:
        self.notify = notify
        self.hidden = hidden
        self.use_gitignore = use_gitignore
        self.documents: list[Document] = []
        self.seen: set[str] = set()
        # notes about skipped files wait until the end: if nothing is left, one error line says it all
        self.notes: list[str] = []
        self.skipped: dict[str, int] = {}

    def skip(self, reason: str, note: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.notes.append(note)

    def describe_skipped(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))

    def admit(self, head: bytes, whole: bool, display: str) -> str | None:
        """The kind of a candidate ('text' or 'lossy'), or None when it is skipped."""
        kind = _classify(head, whole)
        if kind in ("empty", "binary"):
            self.skip(kind, f"note: skipping {display}: {'empty' if kind == 'empty' else 'binary file'}")
            return None
        if kind == "lossy":
            self.notes.append(f"warning: {display}: not valid UTF-8; undecodable bytes replaced with U+FFFD")
        return kind

    # ---- one file -------------------------------------------------------------------------
    def add_file(self, path: str, display: str, *, explicit: bool) -> None:
        key = os.path.realpath(path)
        if key in self.seen:
            return
        self.seen.add(key)
        try:
            size = os.stat(path).st_size
            with open(path, "rb") as fh:
                head = fh.read(SNIFF_BYTES)
        except OSError as exc:
            message = f"cannot read {display}: {exc.strerror or exc}"
            if explicit:
                raise InputError(message) from None
            self.skip("unreadable", f"warning: {message}; skipped")
            return
        kind = self.admit(head, size <= len(head), display)
        if kind is not None:
            self.documents.append(
                Document(display, size, lambda: open(path, "rb"), lossy=kind == "lossy")
            )

    # ---- stdin ------------------------------------------------------------------------------
    def add_stdin(self) -> None:
        if "<stdin>" in self.seen:
            raise InputError("'-' (stdin) given more than once")
        self.seen.add("<stdin>")
        if sys.stdin is None:
            raise InputError("stdin is not available")
        if sys.stdin.isatty():
            self.notify("reading the document from the terminal; end it with Ctrl-D")
        self.add_stream(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>")

    def add_stream(self, stream: IO[bytes], display: str) -> None:
        spool = tempfile.SpooledTemporaryFile(max_size=STDIN_SPOOL_BYTES)
        shutil.copyfileobj(stream, spool)
        size = spool.tell()
        spool.seek(0)
        head = spool.read(SNIFF_BYTES)
        kind = self.admit(head, size <= len(head), display)
        if kind is None:
            return

        def reopen() -> BinaryIO:
            spool.seek(0)
            return _NoClose(spool)  # type: ignore[return-value]

        self.documents.append(Document(display, size, reopen, lossy=kind == "lossy"))

    # ---- directories --------------------------------------------------------------------------
    def add_directory(self, root: str, display: str) -> None:
        root = os.path.abspath(root)
        specs = _parent_specs(root) if self.use_gitignore else []
        self._walk(root, display, specs)

    def _walk(self, directory: str, display: str, specs: list[tuple[str, pathspec.PathSpec]]) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.skip("unreadable", f"warning: cannot list {display}: {exc.strerror or exc}; skipped")
            return
        if self.use_gitignore:
            spec = _load_gitignore(os.path.join(directory, ".gitignore"))
            if spec is not None:
                specs = [*specs, (directory, spec)]
        for entry in entries:
            name = entry.name
            shown = f"{display.rstrip('/')}/{name}" if display not in ("", ".") else name
            if name == ".git" or (name.startswith(".") and not self.hidden):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if not is_dir and entry.is_symlink() and entry.is_dir():
                    self.notes.append(f"note: not following symlinked directory {shown}")
                    continue
                is_file = entry.is_file()
            except OSError:
                continue
            if specs and _ignored(entry.path, is_dir, specs):
                continue
            if is_dir:
                self._walk(entry.path, shown, specs)
            elif is_file:
                self.add_file(entry.path, shown, explicit=False)


class _NoClose:
    """Lets `with` blocks reuse the stdin spool without closing it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def __enter__(self) -> "_NoClose":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _load_gitignore(path: str) -> pathspec.PathSpec | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _parent_specs(root: str) -> list[tuple[str, pathspec.PathSpec]]:
    """.gitignore files above `root` that git would apply: those up to the enclosing repository root."""
    chain: list[str] = []
    current = root
    if os.path.exists(os.path.join(root, ".git")):
        return []  # the walk starts at a repository root; nothing above it applies
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return []  # not inside a git repository: only the walked tree's own .gitignore files
        chain.append(parent)
        if os.path.exists(os.path.join(parent, ".git")):
            break
        current = parent
    specs = []
    for directory in reversed(chain):
        spec = _load_gitignore(os.path.join(directory, ".gitignore"))
        if spec is not None:
            specs.append((directory, spec))
    return specs


def _ignored(path: str, is_dir: bool, specs: list[tuple[str, pathspec.PathSpec]]) -> bool:
    """Git's verdict: the last matching pattern of the deepest .gitignore decides."""
    verdict: bool | None = None
    for base, spec in specs:
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        include = spec.check_file(rel + "/" if is_dir else rel).include
        if include is not None:
            verdict = include
    return bool(verdict)


def collect_documents(
    sources: list[str], *, hidden: bool, use_gitignore: bool, notify: Notify
) -> list[Document]:
    """Resolve SOURCE arguments to documents, in the order given (sorted inside directories).

    Notes about skipped files go to `notify`. Raises InputError for a missing or unreadable named
    file, and when no text is left to read.
    """
    if not sources:
        raise InputError("no SOURCE given (a file, a directory, or - for stdin)")
    collector = _Collector(hidden=hidden, use_gitignore=use_gitignore, notify=notify)
    for source in sources:
        if source == "-":
            collector.add_stdin()
        elif os.path.isdir(source):
            before = len(collector.documents)
            collector.add_directory(source, source)
            if len(collector.documents) == before:
                collector.notes.append(f"note: no text files in {source}")
        elif os.path.isfile(source):
            collector.add_file(source, source, explicit=True)
        elif os.path.exists(source):
            # a pipe such as bash's <(command): readable once, so spooled like stdin
            try:
                with open(source, "rb") as stream:
                    collector.add_stream(stream, source)
            except OSError as exc:
                raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
        else:
            raise InputError(f"no such file or directory: {source}")
    if not collector.documents:
        raise InputError(_nothing_left(sources, collector))
    for note in collector.notes:
        notify(note)
    for document in collector.documents:
        document.notify = notify
    return collector.documents


def _nothing_left(sources: list[str], collector: _Collector) -> str:
    if len(sources) == 1 and sum(collector.skipped.values()) == 1 and not os.path.isdir(sources[0]):
        name = "stdin" if sources[0] == "-" else sources[0]
        reason = next(iter(collector.skipped))
        return {"empty": f"{name} is empty", "binary": f"{name} is a binary file"}.get(reason, f"cannot read {name}")
    where = sources[0] if len(sources) == 1 else "the given sources"
    skipped = collector.describe_skipped()
    return f"no text files in {where}" + (f" (skipped: {skipped})" if skipped else "")
