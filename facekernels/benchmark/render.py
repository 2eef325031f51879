"""Render committed result folders as markdown (the README's Results section).

    python -m facekernels.benchmark.render bench/results/<folder> [...] [--readme README.md]

prints, for each folder, its NOTES.md (if any), the command and commit of its run.txt, one table per
kernel/configuration from results.csv (device, commit and date on each) and its plot.png; with --readme it
replaces the body of the README's "## Results" section with that text instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from . import results


def render_folder(folder: str, relative_to: str) -> str:
    parts = [f"### {os.path.basename(os.path.normpath(folder))}", ""]
    notes = os.path.join(folder, "NOTES.md")
    if os.path.exists(notes):
        parts += [open(notes).read().strip(), ""]
    run = os.path.join(folder, "run.txt")
    if os.path.exists(run):
        fields = dict(line.split(": ", 1) for line in open(run).read().splitlines() if ": " in line)
        if "command" in fields:
            parts += [f"Command: `{fields['command']}` (commit `{fields.get('commit', 'unknown')}`, "
                      f"wall time {fields.get('wall time', '?')}).", ""]  # fmt: skip
    parts.append(results.tables(results.read_csv(os.path.join(folder, "results.csv"))))
    plot = os.path.join(folder, "plot.png")
    if os.path.exists(plot):
        parts += [f"![time and peak memory]({os.path.relpath(plot, relative_to)})", ""]
    return "\n".join(parts)


def render(folders: list, relative_to: str = ".") -> str:
    head = ("Rendered from the committed CSVs by `python -m facekernels.benchmark.render "
            + " ".join(os.path.relpath(f, relative_to) for f in folders) + "`. Times are medians with the "
            "20th and 80th percentiles of one step (\"full\": forward + backward); peak memory is what one step "
            "adds over its inputs; \"speedup vs eager\" is eager time / provider time and \"time / gemm\" the "
            "provider's time over that of the bare matrix products of the same shapes (the floor).")  # fmt: skip
    return "\n\n".join([head, *[render_folder(f, relative_to) for f in folders]])


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the body of the markdown section ``heading`` (up to the next "## ") replaced."""
    match = re.search(rf"^{re.escape(heading)}[ \t]*\n", text, flags=re.M)
    if match is None:
        raise ValueError(f"no {heading!r} section")
    following = re.search(r"^## ", text[match.end() :], flags=re.M)
    end = match.end() + following.start() if following else len(text)
    return text[: match.end()] + "\n" + body.strip() + "\n" + ("\n" if following else "") + text[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m facekernels.benchmark.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("folders", nargs="+")
    p.add_argument("--readme", default=None, help="write into this file's '## Results' section")
    args = p.parse_args(argv)
    if args.readme:
        base = os.path.dirname(os.path.abspath(args.readme))
        body = render(args.folders, base)
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_section(text, "## Results", body))
    else:
        print(render(args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
