"""Any `sacli` command with stage 1's sampled rows in blocks of BLOCK rows instead of 64: the
same number of rows (`sample_ratio` of the sequence), spread as more, shorter blocks.

    python3 benchmarks/eval/sample_block.py 16 eval fidelity book.txt --lengths 64K ...

The block size is not a setting: this script changes the default of
`sacli.kernels.selection.sample_rows` for the one process, so every caller (the Triton and
PyTorch paths, `sacli eval`, `sacli bench`) samples alike. The result files record the `sacli`
command only; name them after the block.
"""

import inspect
import sys

import sacli.kernels.selection as selection


def main() -> None:
    block = int(sys.argv[1])
    assert block >= 1, f"block must be >= 1, got {block}"
    names = list(inspect.signature(selection.sample_rows).parameters)
    assert names[2:] == ["block", "device"], f"sample_rows' parameters changed: {names}"
    defaults = list(selection.sample_rows.__defaults__)  # (block, device)
    defaults[0] = block
    selection.sample_rows.__defaults__ = tuple(defaults)
    sys.argv = ["sacli", *sys.argv[2:]]
    from sacli.cli import main as sacli_main

    sacli_main()


if __name__ == "__main__":
    main()
