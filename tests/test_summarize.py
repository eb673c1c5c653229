"""Batch summarization jobs with a fake engine: records, failures, resuming, shards, merging, CLI.

The end-to-end tests through the real model (subprocesses, SIGKILL, two ranks) are in
test_summarize_e2e.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sacli import summarize as job
from sacli.config import Settings
from sacli.errors import ContextLimitError, InputError, ModelError, UsageError
from sacli.jobs import (
    ResultStore,
    Shard,
    detect_shard,
    family,
    merge,
    parse_shard,
    read_records,
    record_key,
    shard_of,
)
from sacli.summarize import JobOptions, fingerprint, read_path_list, run_job
from sacli.summarize_cmd import summarize as summarize_command

SETTINGS = Settings(model="fake-model", max_new_tokens=8)


@dataclass
class FakeResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    sparsity: float
    attention: str


class FakeEngine:
    """Summarizes by counting words; files whose text contains a trigger word fail on purpose."""

    instances: list[FakeEngine] = []

    def __init__(self, settings: Settings, notify) -> None:
        self.settings = settings
        self.calls: list[list[str]] = []
        FakeEngine.instances.append(self)

    def answer(self, documents, question, *, on_text=None):
        import torch

        text = "".join(chunk for d in documents for chunk in d.read_chunks())
        self.calls.append([d.path for d in documents])
        if "TOOLONG" in text:
            raise ContextLimitError("prompt needs 9000 tokens (8744 prompt + 256 new) but fake was trained for 8192")
        if "OOM" in text:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "BUG" in text:
            raise RuntimeError("unexpected failure inside the model")
        words = len(text.split())
        return FakeResult(
            text=f"{question[:10]}|{'+'.join(d.path for d in documents)}|{words} words",
            prompt_tokens=words + 7,
            new_tokens=3,
            ttft_ms=1.25,
            sparsity=0.5,
            attention="sparse",
        )


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path with no user config, no shard variables, and the fake engine as default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SACLI_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("SACLI_HOME", str(tmp_path / "home"))
    for name in list(os.environ):
        if name.startswith("SACLI_") and name not in ("SACLI_CONFIG", "SACLI_HOME"):
            monkeypatch.delenv(name)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                 "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(job, "_default_engine", FakeEngine)
    FakeEngine.instances.clear()


def write(path: str, content: str | bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def corpus(n: int = 4, folder: str = "docs") -> list[Path]:
    return [write(f"{folder}/doc{i}.txt", f"document {i} says " + "words " * (i + 3) + "\n") for i in range(n)]


def records(path: str | Path) -> list[dict]:
    lines = Path(path).read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def ok_counts(recs: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in recs:
        if r["status"] == "ok":
            counts[r["path"]] = counts.get(r["path"], 0) + 1
    return counts


def run(sources, out="out.jsonl", settings=SETTINGS, options=JobOptions(), shard=Shard(), **kw):
    messages: list[str] = []
    report = run_job(list(sources), Path(out), settings, options, shard=shard, notify=messages.append, **kw)
    return report, messages


# ---------------------------------------------------------------------------------------- records


def test_one_record_per_document_with_every_field():
    docs = corpus(3)
    report, _ = run(["docs"])
    recs = records("out.jsonl")
    assert report.ok == 3 and report.failed == 0 and report.exit_code == 0
    assert sorted(r["path"] for r in recs) == sorted(str(Path(p)) for p in docs)
    values, settings_id = fingerprint(SETTINGS, JobOptions())
    for r in recs:
        data = Path(r["path"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert r["status"] == "ok"
        assert r["tokens"] == len(data.split()) + 7
        assert r["new_tokens"] == 3 and r["stopped_at_limit"] is False
        assert r["ttft_ms"] == 1.25 and r["sparsity"] == 0.5 and r["attention"] == "sparse"
        assert r["summary"].endswith(f"|{r['path']}|{len(data.split())} words")
        assert r["model"] == "fake-model"
        assert r["settings"] == values and r["settings_id"] == settings_id
        assert r["timestamp"].endswith("Z") and r["shard"] == "0/1"
    # shortest first
    assert [r["path"] for r in recs] == [str(Path(p)) for p in docs]
    assert report.prompt_tokens == sum(r["tokens"] for r in recs)
    assert report.tokens_per_s > 0 and report.docs_per_min > 0


def test_failures_are_isolated_and_recorded():
    corpus(2)
    write("bad/binary.dat", b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    write("bad/latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"))
    write("bad/empty.txt", "  \n")
    write("bad/long.txt", "TOOLONG text\n")
    write("bad/oom.txt", "OOM text\n")
    write("bad/bug.txt", "BUG text\n")
    explicit = ["bad/binary.dat", "bad/latin1.txt", "bad/empty.txt", "bad/long.txt", "bad/oom.txt", "bad/bug.txt"]
    report, messages = run(["docs", *explicit])
    recs = {r["path"]: r for r in records("out.jsonl")}
    assert report.ok == 2 and report.failed == 6 and report.exit_code == 1
    expected = {
        "bad/binary.dat": ("InputError", "binary file"),
        "bad/latin1.txt": ("InputError", "not valid UTF-8"),
        "bad/empty.txt": ("InputError", "is empty"),
        "bad/long.txt": ("ContextLimitError", "trained for 8192"),
        "bad/oom.txt": ("OutOfMemory", "out of memory"),
        "bad/bug.txt": ("RuntimeError", "unexpected failure"),
    }
    for path, (kind, text) in expected.items():
        r = recs[path]
        assert r["status"] == "error" and r["summary"] is None
        assert r["error_type"] == kind and text in r["error"], r
        assert r["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert all(recs[f"docs/doc{i}.txt"]["status"] == "ok" for i in range(2))
    assert sum(m.startswith("error: ") for m in messages) == 6


def test_model_error_stops_the_job_without_records(monkeypatch):
    corpus(2)

    def broken(settings, notify):
        raise ModelError("cannot load fake-model")

    with pytest.raises(ModelError):
        run(["docs"], engine_factory=broken)
    assert Path("out.jsonl").read_bytes() == b""


def test_missing_source_is_a_usage_error_before_any_work():
    corpus(1)
    with pytest.raises(UsageError, match="no such file"):
        run(["docs", "nope.txt"])
    assert not Path("out.jsonl").exists()


def test_output_files_are_not_inputs_and_progress_is_reported():
    corpus(3, folder=".")
    run(["."], shard=Shard(0, 2))
    seen = []
    report, _ = run(["."], progress=seen.append)
    assert report.planned == 3  # neither out.jsonl nor out.rank0-of-2.jsonl
    assert {r["path"] for r in records("out.jsonl")} | {r["path"] for r in records("out.rank0-of-2.jsonl")} == {
        f"doc{i}.txt" for i in range(3)}
    assert [(p.done, p.total) for p in seen] == [(i, report.processed) for i in range(report.processed + 1)]
    assert seen[-1].bytes_done == seen[-1].bytes_total > 0


def test_nothing_to_summarize_is_an_input_error():
    write("empty/.hidden.txt", "hidden text\n")
    with pytest.raises(InputError, match="no text files"):
        run(["empty"])


# ---------------------------------------------------------------------------------------- resuming


def test_rerun_skips_ok_retries_errors_and_keeps_one_ok_line():
    corpus(3)
    write("docs/flaky.txt", "OOM once\n")
    first, _ = run(["docs"])
    assert (first.ok, first.failed) == (3, 1)

    again, _ = run(["docs"])
    assert (again.skipped, again.ok, again.failed) == (3, 0, 1)
    assert FakeEngine.instances[-1].calls == [["docs/flaky.txt"]]

    write("docs/flaky.txt", "fine now\n")
    fixed, _ = run(["docs"])
    assert (fixed.skipped, fixed.ok, fixed.failed, fixed.exit_code) == (3, 1, 0, 0)
    recs = records("out.jsonl")
    assert set(ok_counts(recs).values()) == {1} and len(ok_counts(recs)) == 4
    # the older error lines of flaky.txt stay (append-only); --merge drops them
    assert [r["status"] for r in recs if r["path"] == "docs/flaky.txt"] == ["error", "error", "ok"]


def test_done_job_does_not_load_the_model():
    corpus(2)
    run(["docs"])
    FakeEngine.instances.clear()
    report, messages = run(["docs"])
    assert report.skipped == 2 and report.processed == 0 and FakeEngine.instances == []
    assert any("2 of 2 documents already done" in m for m in messages)


def test_changed_content_is_summarized_again():
    docs = corpus(2)
    run(["docs"])
    write(str(docs[0]), "completely new text\n")
    report, _ = run(["docs"])
    assert (report.skipped, report.ok) == (1, 1)
    recs = [r for r in records("out.jsonl") if r["path"] == str(docs[0])]
    assert len(recs) == 2 and recs[0]["sha256"] != recs[1]["sha256"]


def test_settings_that_change_output_redo_others_do_not():
    corpus(2)
    run(["docs"])
    report, _ = run(["docs"], settings=dataclasses.replace(SETTINGS, device="cpu", hidden=True))
    assert report.skipped == 2
    report, _ = run(["docs"], options=JobOptions(prompt="List the key dates"))
    assert report.ok == 2
    report, _ = run(["docs"], settings=dataclasses.replace(SETTINGS, alpha=0.9))
    assert report.ok == 2
    assert len({r["settings_id"] for r in records("out.jsonl")}) == 3


def test_fingerprint():
    base_values, base = fingerprint(SETTINGS, JobOptions())
    assert {"model", "prompt", "alpha", "window", "sample_ratio", "dense", "max_new_tokens", "temperature",
            "system", "rope_scale", "dtype", "dense_below"} <= set(base_values)
    assert "device" not in base_values and "hidden" not in base_values
    changed = [
        fingerprint(dataclasses.replace(SETTINGS, **{k: v}), JobOptions())[1]
        for k, v in [("model", "other"), ("max_new_tokens", 9), ("temperature", 0.5), ("system", "be brief"),
                     ("window", 0.1), ("sample_ratio", 0.1), ("rope_scale", "yarn"), ("dtype", "bfloat16")]
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    assert fingerprint(SETTINGS, JobOptions(per_dir=True))[1] != base
    assert fingerprint(dataclasses.replace(SETTINGS, device="cuda:1", no_gitignore=True), JobOptions())[1] == base
    # with dense attention the SampleAttention knobs do not change the output
    dense = dataclasses.replace(SETTINGS, dense=True)
    assert fingerprint(dense, JobOptions())[1] == fingerprint(dataclasses.replace(dense, alpha=0.5), JobOptions())[1]


def test_torn_last_line_is_dropped_and_redone_once():
    corpus(3)
    run(["docs"])
    data = Path("out.jsonl").read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    # a crash in the middle of the last write: half a line, no newline
    Path("out.jsonl").write_bytes(data[: last_start + (len(data) - last_start) // 2])
    assert read_records(Path("out.jsonl")).torn_bytes > 0
    report, messages = run(["docs"])
    assert (report.skipped, report.ok) == (2, 1)
    assert any("incomplete last line" in m for m in messages)
    recs = records("out.jsonl")  # parses: the torn bytes are gone
    assert len(recs) == 3 and set(ok_counts(recs).values()) == {1}


def test_store_refuses_a_file_that_is_not_ours():
    write("out.jsonl", '{"path": "a", "sha256": "x", "settings_id": "s", "status": "ok"}\nhello world\n')
    with pytest.raises(InputError, match=r"out.jsonl:2: not JSON"):
        ResultStore(Path("out.jsonl"), print).open()
    assert Path("out.jsonl").read_text().endswith("hello world\n")


def test_two_jobs_cannot_append_to_one_file():
    with ResultStore(Path("out.jsonl"), print):
        with pytest.raises(UsageError, match="another running job"):
            ResultStore(Path("out.jsonl"), print).open()
    with ResultStore(Path("out.jsonl"), print):  # released on close
        pass


def test_store_writes_whole_lines():
    with ResultStore(Path("out.jsonl"), print) as store:
        store.append({"path": "a\nb", "sha256": "0", "settings_id": "s", "status": "ok", "summary": "é\n"})
        with pytest.raises(AssertionError):
            store.append({"path": "a"})
    data = Path("out.jsonl").read_bytes()
    assert data.count(b"\n") == 1 and json.loads(data)["summary"] == "é\n"


# ---------------------------------------------------------------------------------------- per-dir


def test_per_dir_records():
    write("tree/a/one.txt", "first file\n")
    write("tree/a/two.txt", "second file\n")
    write("tree/b/three.txt", "third file\n")
    report, _ = run(["tree"], options=JobOptions(per_dir=True))
    recs = {r["path"]: r for r in records("out.jsonl")}
    assert report.ok == 2 and set(recs) == {"tree/a", "tree/b"}
    assert recs["tree/a"]["files"] == ["tree/a/one.txt", "tree/a/two.txt"]
    assert "tree/a/one.txt+tree/a/two.txt" in recs["tree/a"]["summary"]
    assert recs["tree/a"]["settings"]["unit"] == "dir"
    before = recs["tree/a"]["sha256"]
    write("tree/a/two.txt", "second file, edited\n")
    report, _ = run(["tree"], options=JobOptions(per_dir=True))
    assert (report.skipped, report.ok) == (1, 1)
    assert records("out.jsonl")[-1]["path"] == "tree/a" and records("out.jsonl")[-1]["sha256"] != before


# ---------------------------------------------------------------------------------------- shards


def test_shard_detection():
    assert detect_shard({}) == Shard(0, 1)
    assert detect_shard({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert detect_shard({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(3, 4)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
             "SLURM_ARRAY_TASK_STEP": "2"}  # --array=1-7:2 -> tasks 1,3,5,7
    assert detect_shard(slurm) == Shard(3, 4)
    # torchrun with 2 ranks inside array task 1 of 3
    both = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert detect_shard(both) == Shard(3, 6)
    assert detect_shard({"RANK": "1", "WORLD_SIZE": "2"}, "2/5") == Shard(2, 5)
    with pytest.raises(UsageError):
        detect_shard({"RANK": "1"})
    with pytest.raises(UsageError):
        detect_shard({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "3"})
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(UsageError):
            parse_shard(bad)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_documents(count):
    paths = [f"corpus/part{i}/doc{j}.txt" for i in range(13) for j in range(7)]
    owners = [[s for s in range(count) if Shard(s, count).owns(p)] for p in paths]
    assert all(len(o) == 1 for o in owners)
    assert [o[0] for o in owners] == [shard_of(p, count) for p in paths]
    if count > 1:
        assert len({o[0] for o in owners}) == count


def test_shard_file_names():
    assert Shard(0, 1).output_path(Path("out.jsonl")) == Path("out.jsonl")
    assert Shard(0, 2).output_path(Path("res/out.jsonl")) == Path("res/out.rank0-of-2.jsonl")
    assert Shard(3, 4).output_path(Path("out")) == Path("out.rank3-of-4")


def test_sharded_runs_cover_everything_once_and_merge():
    docs = corpus(12)
    reports = [run(["docs"], shard=Shard(i, 3))[0] for i in range(3)]
    files = [Path(f"out.rank{i}-of-3.jsonl") for i in range(3)]
    per_rank = [{r["path"] for r in records(f)} for f in files]
    assert sum(len(p) for p in per_rank) == 12 and set.union(*per_rank) == {str(p) for p in docs}
    assert all(r.planned == len(p) for r, p in zip(reports, per_rank))
    assert sorted(family(Path("out.jsonl"))) == sorted(files)

    report = merge(Path("out.jsonl"), print)
    merged = records("out.jsonl")
    assert (report.ok, report.errors, report.dropped) == (12, 0, 0)
    assert [r["path"] for r in merged] == sorted(str(p) for p in docs)
    # a rerun, sharded or not, finds everything done in the family
    again, _ = run(["docs"])
    assert again.skipped == 12 and again.processed == 0


def test_merge_dedupes_and_prefers_ok():
    def rec(path, status, ts, sha="s1"):
        return {"path": path, "sha256": sha, "settings_id": "id", "status": status, "timestamp": ts}

    lines0 = [rec("a", "error", "2024-01-01T00:00:00.000Z"), rec("a", "ok", "2024-01-01T00:00:02.000Z"),
              rec("c", "error", "2024-01-01T00:00:01.000Z")]
    lines1 = [rec("a", "error", "2024-01-01T00:00:05.000Z"), rec("b", "ok", "2024-01-01T00:00:00.000Z"),
              rec("c", "error", "2024-01-01T00:00:09.000Z") | {"error": "latest"}, rec("b", "ok", "2024-01-01", "s2")]
    Path("out.rank0-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines0) + '{"torn')
    Path("out.rank1-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines1))
    notes: list[str] = []
    report = merge(Path("out.jsonl"), notes.append)
    merged = records("out.jsonl")
    assert [(r["path"], r["sha256"], r["status"]) for r in merged] == [
        ("a", "s1", "ok"), ("b", "s1", "ok"), ("b", "s2", "ok"), ("c", "s1", "error")]
    assert merged[-1]["error"] == "latest"
    assert (report.ok, report.errors, report.dropped, report.torn) == (3, 1, 3, 1)
    assert len({record_key(r) for r in merged}) == len(merged)
    assert any("incomplete last line" in n for n in notes)
    # merging again is a fixed point
    merge(Path("out.jsonl"), print)
    assert records("out.jsonl") == merged


def test_merge_refuses_missing_or_busy_shard_files():
    corpus(4)
    run(["docs"], shard=Shard(0, 2))
    with pytest.raises(InputError, match=r"missing: out.rank1-of-2.jsonl"):
        merge(Path("out.jsonl"), print)
    run(["docs"], shard=Shard(1, 2))
    with ResultStore(Path("out.rank1-of-2.jsonl"), print):
        with pytest.raises(UsageError, match="being written"):
            merge(Path("out.jsonl"), print)
    with pytest.raises(InputError, match="nothing to merge"):
        merge(Path("other.jsonl"), print)


def test_read_path_list():
    assert read_path_list(io.BytesIO(b"a.txt\r\nb c.md\n\n  \nd\n"), nul=False) == ["a.txt", "b c.md", "d"]
    assert read_path_list(io.BytesIO(b"with\nnewline.txt\0x.txt\0"), nul=True) == ["with\nnewline.txt", "x.txt"]


# ---------------------------------------------------------------------------------------- the command


def invoke(args, input=None, env=None):
    app = typer.Typer()
    app.command()(summarize_command)
    app.command("unused")(lambda: None)  # a second command keeps `summarize` a named subcommand
    return CliRunner().invoke(app, ["summarize", *args], input=input, env=env)


def test_cli_exit_codes_and_json_report():
    corpus(2)
    result = invoke(["docs", "--out", "s.jsonl", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] == 2 and report["failed"] == 0 and report["docs_per_min"] > 0
    assert "documents/min" in result.stderr and "tokens/s" in result.stderr

    write("docs/bug.txt", "BUG\n")
    result = invoke(["docs", "--out", "s.jsonl"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "1 failed" in result.stderr and "2 already done" in result.stderr

    for args in (["docs"], ["missing.txt", "-o", "s.jsonl"], ["docs", "-o", "s.jsonl", "-0"],
                 ["docs", "-o", "s.jsonl", "--merge"], ["docs", "-o", "s.jsonl", "--shard", "3/2"],
                 ["docs", "-o", "s.jsonl", "--alpha", "2"]):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_cli_from_stdin_and_prompt():
    docs = corpus(3)
    listing = b"\0".join(str(p).encode() for p in docs[:2]) + b"\0"
    result = invoke(["--from-stdin", "-0", "-o", "s.jsonl", "--prompt", "List the key dates"], input=listing)
    assert result.exit_code == 0, result.output
    recs = records("s.jsonl")
    assert sorted(r["path"] for r in recs) == sorted(str(p) for p in docs[:2])
    assert all(r["settings"]["prompt"] == "List the key dates" for r in recs)
    result = invoke(["--from-stdin", "-o", "s.jsonl"], input=f"{docs[2]}\n")
    assert result.exit_code == 0 and len(records("s.jsonl")) == 3


def test_cli_shards_and_merge(monkeypatch):
    corpus(6)
    for rank in (0, 1):
        result = invoke(["docs", "-o", "s.jsonl"], env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert result.exit_code == 0, result.output
        assert f"[{rank}/2]" in result.stderr and "--merge" in result.stderr
    result = invoke(["--merge", "-o", "s.jsonl", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] == 6
    assert len(records("s.jsonl")) == 6
