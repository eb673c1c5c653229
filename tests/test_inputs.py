"""Reading SOURCE arguments: walking, .gitignore, hidden files, binaries, encodings, chunking."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import pytest

from sacli.errors import InputError
from sacli.inputs import _cut_point, collect_documents


def collect(sources, *, hidden=False, use_gitignore=True):
    notes: list[str] = []
    docs = collect_documents([str(s) for s in sources], hidden=hidden, use_gitignore=use_gitignore, notify=notes.append)
    return docs, notes


def text_of(doc, chunk_bytes=1 << 20) -> str:
    return "".join(doc.read_chunks(chunk_bytes))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def names(docs, root: Path) -> list[str]:
    return [d.path.removeprefix(str(root) + "/") for d in docs]


def test_directory_walk_is_sorted_recursive_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ["b.txt", "a.md", "sub/z.txt", "sub/deeper/y.txt", ".hidden.txt", ".cache/x.txt", "A.txt"]:
        write(tmp_path / rel, f"text of {rel}\n")
    docs, _ = collect([tmp_path])
    assert names(docs, tmp_path) == ["A.txt", "a.md", "b.txt", "sub/deeper/y.txt", "sub/z.txt"]
    assert text_of(docs[0]) == "text of A.txt\n"
    docs, _ = collect([tmp_path], hidden=True)
    assert names(docs, tmp_path) == [".cache/x.txt", ".hidden.txt", "A.txt", "a.md", "b.txt", "sub/deeper/y.txt", "sub/z.txt"]


def test_gitignore_nested_negation_and_ignored_directories(tmp_path: Path) -> None:
    write(tmp_path / ".gitignore", "*.log\nbuild/\nsecret.txt\n")
    write(tmp_path / "sub/.gitignore", "!keep.log\nlocal.txt\n")
    for rel in ["main.txt", "x.log", "build/out.txt", "secret.txt", "sub/keep.log", "sub/drop.log", "sub/local.txt",
                "sub/ok.txt", "other/local.txt"]:
        write(tmp_path / rel, f"{rel}\n")
    docs, _ = collect([tmp_path])
    assert names(docs, tmp_path) == ["main.txt", "other/local.txt", "sub/keep.log", "sub/ok.txt"]
    docs, _ = collect([tmp_path], use_gitignore=False)
    assert len(docs) == 9


def test_gitignore_of_enclosing_repository_applies(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    write(tmp_path / ".gitignore", "*.tmp\n/docs/private/\n")
    write(tmp_path / "docs/a.txt", "a\n")
    write(tmp_path / "docs/b.tmp", "b\n")
    write(tmp_path / "docs/private/c.txt", "c\n")
    docs, _ = collect([tmp_path / "docs"])
    assert names(docs, tmp_path / "docs") == ["a.txt"]


def test_named_file_is_used_even_if_hidden_or_ignored(tmp_path: Path) -> None:
    write(tmp_path / ".gitignore", "*.txt\n")
    hidden = write(tmp_path / ".notes.txt", "hidden\n")
    docs, _ = collect([hidden])
    assert [d.path for d in docs] == [str(hidden)]


def test_binary_files_are_skipped_with_a_note(tmp_path: Path) -> None:
    write(tmp_path / "text.txt", "plain text\n")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(200))
    rng = random.Random(1)
    # NUL-free but full of control bytes: binary without the NUL shortcut
    write(tmp_path / "packed.dat", bytes(rng.choice([1, 2, 3, 200, 250, 65, 66]) for _ in range(4000)))
    docs, notes = collect([tmp_path])
    assert names(docs, tmp_path) == ["text.txt"]
    assert sum("binary" in n for n in notes) == 2
    assert any("image.png" in n for n in notes) and any("packed.dat" in n for n in notes)


def test_directory_of_only_binaries_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.bin", b"\x00\x01\x02" * 100)
    write(tmp_path / "b.bin", b"\x7fELF\x00" * 100)
    with pytest.raises(InputError, match=r"no text files in .* \(skipped: 2 binary\)"):
        collect([tmp_path])


def test_non_utf8_text_is_decoded_with_replacement_and_warned(tmp_path: Path) -> None:
    latin = write(tmp_path / "latin1.txt", "Caf\u00e9 cr\u00e8me, na\u00efve\n".encode("latin-1"))
    docs, notes = collect([latin])
    assert len(docs) == 1
    assert any(n.startswith("warning:") and "latin1.txt" in n and "UTF-8" in n for n in notes)
    assert text_of(docs[0]) == "Caf\ufffd cr\ufffdme, na\ufffdve\n"


def test_bad_bytes_after_the_sniffed_head_warn_when_read(tmp_path: Path) -> None:
    head = ("good line\n" * 2000).encode()
    path = write(tmp_path / "late.txt", head + b"bad \xff byte\n")
    docs, notes = collect([path])
    assert notes == []
    warnings: list[str] = []
    docs[0].notify = warnings.append
    text = text_of(docs[0], chunk_bytes=1000)
    assert text.endswith("bad \ufffd byte\n")
    assert len(warnings) == 1 and f"offset {len(head) + 4}" in warnings[0]
    assert text_of(docs[0]) == text and len(warnings) == 1  # warned once per document


def test_utf8_bom_and_crlf_are_normalized(tmp_path: Path) -> None:
    path = write(tmp_path / "win.txt", "\ufeffline one\r\nline two\rline three\r\n\r\nend\r".encode("utf-8"))
    docs, _ = collect([path])
    for chunk_bytes in (1, 2, 3, 7, 1 << 20):
        assert text_of(docs[0], chunk_bytes) == "line one\nline two\nline three\n\nend\n"
    crlf = write(tmp_path / "crlf.txt", ("word " * 9 + "end\r\n") * 200)
    docs, _ = collect([crlf])
    chunks = list(docs[0].read_chunks(300))
    assert all(c.endswith("\n") for c in chunks[:-1])  # newline cuts still found in CRLF text


def test_multibyte_characters_split_across_reads(tmp_path: Path) -> None:
    content = "".join(random.Random(2).choice(["é", "漢", "🙂", "a", " ", "\n", "b"]) for _ in range(5000))
    path = write(tmp_path / "u.txt", content)
    docs, _ = collect([path])
    for chunk_bytes in (1, 5, 97, 1025):
        assert text_of(docs[0], chunk_bytes) == content


def test_chunks_end_at_safe_points(tmp_path: Path) -> None:
    content = "".join(f"word{i} " + ("\n" if i % 7 == 0 else "") + ("\n\n" if i % 31 == 0 else "") for i in range(3000))
    path = write(tmp_path / "w.txt", content)
    docs, _ = collect([path])
    chunks = list(docs[0].read_chunks(500))
    assert len(chunks) > 10 and "".join(chunks) == content
    for left, right in zip(chunks, chunks[1:]):
        assert not left[-1].isspace() or (left[-1] == "\n" and not left[-2].isspace()), repr(left[-5:])
        assert not right[0].isspace() or (right[0] == " " and not right[1].isspace()), repr(right[:5])


def test_cut_point_rules() -> None:
    assert _cut_point("abc\ndef", hard=False) == 4
    assert _cut_point("abc\n\ndef", hard=False) == 0  # a run of newlines is never split
    assert _cut_point("abc def\n\nghi", hard=False) == 3  # falls back to the space between words
    assert _cut_point("abcdef", hard=False) == 0
    assert _cut_point("abcdef", hard=True) == 6


def test_empty_file_alone_is_an_error_and_skipped_among_others(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(InputError, match=r"empty\.txt is empty"):
        collect([empty])
    blank = write(tmp_path / "blank.txt", " \n\n ")
    with pytest.raises(InputError, match=r"blank\.txt is empty"):
        collect([blank])
    full = write(tmp_path / "full.txt", "something\n")
    docs, notes = collect([empty, full])
    assert [d.path for d in docs] == [str(full)]
    assert any("empty.txt" in n and "empty" in n for n in notes)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or directory: .*nope.txt"):
        collect([tmp_path / "nope.txt"])


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path / "locked.txt", "secret\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user can read files with mode 000 (root)")
        with pytest.raises(InputError, match="cannot read .*locked.txt: Permission denied"):
            collect([path])
        write(tmp_path / "ok.txt", "fine\n")
        docs, notes = collect([tmp_path])
        assert names(docs, tmp_path) == ["ok.txt"]
        assert any("locked.txt" in n for n in notes)
    finally:
        path.chmod(0o644)


def test_same_file_twice_is_read_once(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "a\n")
    docs, _ = collect([path, tmp_path, path])
    assert len(docs) == 1


def test_stdin_is_spooled_and_rereadable(monkeypatch: pytest.MonkeyPatch) -> None:
    data = ("line of stdin text\n" * 100_000).encode()  # larger than the in-memory spool
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    docs, _ = collect(["-"])
    assert docs[0].path == "<stdin>" and docs[0].size == len(data)
    assert text_of(docs[0]) == data.decode()
    assert text_of(docs[0]) == data.decode()


def test_empty_stdin_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(InputError, match="stdin is empty"):
        collect(["-"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_read_like_stdin(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as fh:
            fh.write(b"from a pipe\n")

    thread = threading.Thread(target=feed)
    thread.start()
    docs, _ = collect([fifo])
    thread.join()
    assert text_of(docs[0]) == "from a pipe\n"
