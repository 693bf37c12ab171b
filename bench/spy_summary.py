"""Summarise a py-spy raw profile (`py-spy record -f raw`): self and inclusive shares per frame.

    python bench/spy_summary.py PROFILE.txt [TOP]
"""

from __future__ import annotations

import collections
import sys


def summarise(path: str, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples", "self %:"]
    lines += [f"{100 * n / total:5.1f} {frame[:140]}" for frame, n in own.most_common(top)]
    lines.append("inclusive %:")
    lines += [f"{100 * n / total:5.1f} {frame[:140]}" for frame, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
