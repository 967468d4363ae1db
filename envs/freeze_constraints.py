"""Write envs/constraints.txt: the exact versions installed here of everything the project's
install (`pip install -e ".[workflow,serve,test]"`) pulls in, found by walking the installed
distributions' requirements from the installed project's (extras and environment markers
honoured; reinstall the project after editing pyproject.toml).
Also stamps the lock's sha256 into envs/*.post-deploy.sh, so that Snakemake (which hashes the
environment file and its post-deploy script) rebuilds the conda environments when it changes.

Usage: python3 envs/freeze_constraints.py
"""

from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("workflow", "serve", "test")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[tuple[str, frozenset[str]]]) -> dict[str, str]:
    """canonical name -> installed version, for every requirement reachable from the roots."""
    seen: dict[str, str] = {}
    extras_seen: set[tuple[str, str]] = set()
    todo = list(requirements)
    while todo:
        spec, extras = todo.pop()
        req = Requirement(spec)
        # A requirement counts when its marker holds for one of the extras asked of its parent.
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            continue
        name = canonical(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            print(f"# not installed here: {req.name}", file=sys.stderr)
            continue
        new_extras = {e for e in req.extras if (name, e) not in extras_seen}
        if name in seen and not new_extras:
            continue
        seen[name] = dist.version
        extras_seen.update((name, e) for e in req.extras)
        for sub in dist.requires or []:
            todo.append((sub, frozenset(req.extras)))
    return seen


LOCK = ROOT / "envs" / "constraints.txt"
STAMP = re.compile(r"^# constraints.txt sha256: \S+$", re.M)


def lock_text() -> str:
    pins = closure([(f"llava-reid[{','.join(EXTRAS)}]", frozenset())])
    pins.pop("llava-reid")
    lines = [
        "# Exact versions that produced the README's numbers (torch 2.13.0 CPU build, Python "
        f"{sys.version_info.major}.{sys.version_info.minor}, Linux x86_64).",
        "# Use: pip install -c envs/constraints.txt ... (README, .ci/run, envs/*.post-deploy.sh)."
        " Regenerate: python3 envs/freeze_constraints.py",
        # No local label (+cpu): ==2.13.0 also matches the CPU index's 2.13.0+cpu.
        *(f"{name}=={pins[name].split('+')[0]}" for name in sorted(pins)),
    ]
    return "\n".join(lines) + "\n"


def lock_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> None:
    text = lock_text()
    LOCK.write_text(text)
    for script in sorted((ROOT / "envs").glob("*.post-deploy.sh")):
        stamped = STAMP.sub(f"# constraints.txt sha256: {lock_hash(text)}", script.read_text())
        script.write_text(stamped)
    print(f"wrote {LOCK} ({text.count(chr(10)) - 2} pins)")


if __name__ == "__main__":
    main()
