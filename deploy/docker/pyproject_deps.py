"""Print the requirements of pyproject.toml's extras, one a line, for a Docker dependency layer.

    python pyproject_deps.py gateway        # dependencies + the gateway extra
    python pyproject_deps.py cpu            # dependencies + cpu (and runtime, which cpu names)
    python pyproject_deps.py --build cpu    # also [build-system] requires, so that the project itself
                                            # installs later with --no-build-isolation, offline

The image installs these before the source is copied, so editing code does not rebuild the (large)
dependency layer; pins stay in one place, pyproject.toml. Self-references such as
``flylora-serve[runtime]`` are expanded.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            self_ref = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if self_ref:
                todo.extend(self_ref.group(1).split(","))
            else:
                out.append(req)
    return sorted(set(out))


def main(argv: list[str]) -> int:
    path = Path(__file__).with_name("pyproject.toml")
    if not path.is_file():
        path = Path("pyproject.toml")
    data = tomllib.loads(path.read_text())
    extras = argv[1:]
    build = "--build" in extras
    extras = [e for e in extras if e != "--build"]
    reqs = requirements(data, extras)
    if build:
        reqs = sorted(set(reqs) | set(data.get("build-system", {}).get("requires", [])))
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
