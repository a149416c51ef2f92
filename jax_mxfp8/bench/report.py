"""What the benchmarks' command lines and reports share: integer-list options, and writing a
report as JSON, markdown and a plot."""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable


def positive_ints(text: str) -> list[int]:
    """argparse type of "1,16,64": positive integers, comma-separated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def write_report(report: dict, out_dir: str, stem: str, markdown: Callable[[dict], str],
                 plot: Callable[[dict, str], str | None]) -> None:
    """out_dir/stem.json, stem.png (plot returns a note instead where it cannot draw: the note
    is printed and appended) and stem.md."""
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(report)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1)
    note = plot(report, os.path.join(out_dir, f"{stem}.png"))
    if note:
        print(note)
        text += f"\n{note}\n"
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(text)
