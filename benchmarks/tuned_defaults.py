"""Turns the autotuning files of GPU runs into the choices that ship with sacli.

    python3 benchmarks/tuned_defaults.py AUTOTUNE.json... [--out kernels/tuned_defaults.json]

Each input is a `$SACLI_HOME/autotune.json` written on a GPU (kernels/tuning.py). Only entries
made by the kernels as they are now are taken: the Triton source hash in each entry's context
must equal this checkout's (so run it without TRITON_INTERPRET, with the Triton version of the
GPU run). Entries are re-keyed on what tuning.portable_context() matches: kernel, its own
source, its configs and the GPU model. Later inputs win where two give a choice for one key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=REPO / "kernels" / "tuned_defaults.json")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tuned_defaults.py: unset TRITON_INTERPRET (the interpreter's kernels have no source hash)")

    from sacli.kernels import tuning

    tuners = tuning.product_tuners()
    choices: dict[str, dict[str, str]] = {}
    taken = skipped = 0
    for path in args.inputs:
        for context, entries in json.loads(path.read_text())["choices"].items():
            name, source, _configs, device, *_versions = context.split(" | ")
            tuner = tuners.get(name)
            if tuner is None or tuner.fn.cache_key[:16] != source:
                skipped += len(entries)
                continue
            by_str = {str(c): c for c in tuner.configs}
            gpu = device.rsplit(" cuda ", 1)[0]
            target = choices.setdefault(tuning.portable_context(tuner, gpu), {})
            for key, config in entries.items():
                if config in by_str:
                    target[key] = tuning.portable_config(by_str[config])
                    taken += 1
                else:
                    skipped += 1
    payload = {
        "format": tuning.FORMAT,
        "note": (f"made {datetime.now(timezone.utc).isoformat(timespec='seconds')} by benchmarks/tuned_defaults.py "
                 f"from {', '.join(p.name for p in args.inputs)}"),
        "choices": {c: dict(sorted(e.items())) for c, e in sorted(choices.items())},
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{taken} choices kept, {skipped} skipped (other kernels or sources) -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
