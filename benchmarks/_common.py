"""What the benchmark scripts share: the name of the machine they ran on, and writing a
result's JSON and markdown."""

import json
import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(stem: str, res: dict, text: list[str]) -> None:
    """``res`` to ``stem.json`` and the table lines ``text`` to ``stem.md``."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text) + "\n")
