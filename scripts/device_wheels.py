"""The GPU check's wheel list (scripts/device_wheels.txt): read it, check it, check a folder.

The GPU machine runs CPython 3.12 with torch, transformers and a few more already installed
and reaches no network, so the check carries the rest as wheels. :func:`list_problems` says,
one line each, where the list fails the project (no network, no wheels needed):

* a pin outside the specifier pyproject.toml gives that distribution;
* a pin that differs from the version this environment has installed (the GPU check must
  run what CI runs; this environment's metadata is also what the next check reads);
* a requirement of a pinned distribution (markers evaluated for the GPU machine) that is
  neither pinned at a version satisfying it nor on the GPU image;
* a project dependency that is neither pinned, on the GPU image, nor declared not carried.

:func:`folder_problems` checks a downloaded folder against the list: exactly one wheel per
pin, each installable on the GPU machine, and the total size.

    python scripts/device_wheels.py check               # the list against the project
    python scripts/device_wheels.py platforms           # pip's --platform values
    python scripts/device_wheels.py check-folder DIR    # a folder of wheels; prints sizes
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINS_FILE = ROOT / "scripts" / "device_wheels.txt"
PYPROJECT = ROOT / "pyproject.toml"
MIB = 1 << 20
# A device call carries at most 64 MiB in all, the working tree included.
MAX_TOTAL_BYTES = 32 * MIB

PYTHON = (3, 12)
# torch 2.11's own wheels need glibc 2.28, so every manylinux tag up to 2.28 installs there.
GLIBC_MAX = 28
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MAX, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
]
# Marker values of the GPU machine (CPython 3.12, Linux x86-64).
TARGET_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
# Installed on the GPU machine's image, each with its own dependencies.
GPU_IMAGE = ("torch", "transformers", "pyarrow", "msgpack", "xxhash", "safetensors", "typer", "rich", "pyyaml")
# Said absent from that image (issue #20), though this environment's newer typer requires pydantic.
ABSENT_FROM_IMAGE = ("deepspeed", "pyzmq", "pydantic", "pydantic-core", "pebble", "math-verify", "ray", "vllm")
# Project dependencies the check never imports, so they stay behind.
NOT_CARRIED = {
    "ray": "the check places nothing on Ray",
    "tensorboard": "a job's metrics writer",
    "matplotlib": "a run folder's plots",
}


def read_pins(path: Path = PINS_FILE) -> dict[str, Version]:
    """{canonical name: pinned version} from ``name==version`` lines (comments ignored)."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path.name}:{number}: {raw!r}: expected name==version")
        pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def project_requirements(pyproject: Path = PYPROJECT) -> tuple[list[Requirement], list[Requirement]]:
    """(runtime dependencies, requirements of every optional extra) of the project."""
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for group in project.get("optional-dependencies", {}).values() for r in group]
    return runtime, extras


def applies(req: Requirement, extras: set[str] = frozenset()) -> bool:
    """Whether ``req`` applies on the GPU machine when its requirer is installed with ``extras``."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET_MARKERS, "extra": extra}) for extra in {"", *extras})


def requirements_of(name: str, extras: set[str] = frozenset()) -> list[Requirement]:
    """What the installed distribution ``name`` requires on the GPU machine (with ``extras``)."""
    return [r for r in map(Requirement, md.requires(name) or []) if applies(r, extras)]


def image_closure() -> set[str]:
    """Canonical names on the GPU image: GPU_IMAGE and, transitively, what those require
    (read from this environment's metadata; a name not installed here is kept, unexpanded),
    less ABSENT_FROM_IMAGE."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in GPU_IMAGE]
    while todo:
        name = todo.pop()
        if name in seen or name in ABSENT_FROM_IMAGE:
            continue
        seen.add(name)
        try:
            todo += [canonicalize_name(r.name) for r in requirements_of(name)]
        except md.PackageNotFoundError:
            pass
    return seen


def list_problems(pins: dict[str, Version] | None = None) -> list[str]:
    """One line per way the wheel list fails the project; empty when it resolves."""
    pins = read_pins() if pins is None else pins
    image = image_closure()
    runtime, extras = project_requirements()
    problems = []
    for req in runtime + extras:
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is not None and not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}=={pinned} does not satisfy the project's {req}")
    for req in runtime:
        name = canonicalize_name(req.name)
        if name not in pins and name not in image and name not in NOT_CARRIED:
            problems.append(f"{req.name}: a project dependency neither pinned, on the GPU image, "
                            "nor in device_wheels.NOT_CARRIED")
    wanted_extras = requested_extras(pins, runtime)
    for name, version in pins.items():
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            problems.append(f"{name}=={version} is pinned but not installed in this environment")
            continue
        if installed != version:
            problems.append(f"{name}=={version} is pinned but this environment has {installed}: pin {installed}")
        for req in requirements_of(name, wanted_extras.get(name, set())):
            dep = canonicalize_name(req.name)
            if dep in pins:
                if not req.specifier.contains(pins[dep], prereleases=True):
                    problems.append(f"{name} requires {req}, but {dep}=={pins[dep]} is pinned")
            elif dep not in image:
                problems.append(f"{name} requires {req}: neither pinned nor on the GPU image")
    return problems


def requested_extras(pins: dict[str, Version], runtime: list[Requirement]) -> dict[str, set[str]]:
    """{pinned name: extras asked of it} by the project and, transitively, by other pins."""
    extras = {canonicalize_name(r.name): {canonicalize_name(e) for e in r.extras} for r in runtime}
    changed = True
    while changed:
        changed = False
        for name in pins:
            try:
                reqs = requirements_of(name, extras.get(name, set()))
            except md.PackageNotFoundError:
                continue
            for req in reqs:
                asked = extras.setdefault(canonicalize_name(req.name), set())
                new = {canonicalize_name(e) for e in req.extras} - asked
                changed |= bool(new)
                asked |= new
    return extras


def supported_tags() -> set[tags.Tag]:
    interpreter = f"cp{PYTHON[0]}{PYTHON[1]}"
    cpython = tags.cpython_tags(PYTHON, abis=[interpreter], platforms=PLATFORMS)
    generic = tags.compatible_tags(PYTHON, interpreter=interpreter, platforms=PLATFORMS)
    return {*cpython, *generic}


def folder_problems(folder: Path, pins: dict[str, Version] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(problems, [(wheel file, bytes)]) of a folder that should hold one wheel per pin."""
    pins = read_pins() if pins is None else pins
    supported = supported_tags()
    problems, sizes, found = [], [], {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        sizes.append((path.name, path.stat().st_size))
        found[name] = version
        if pins.get(name) != version:
            problems.append(f"{path.name}: not in the list (pinned: {pins.get(name)})")
        if not wheel_tags & supported:
            problems.append(f"{path.name}: no tag installs on CPython {PYTHON[0]}.{PYTHON[1]} manylinux x86-64")
    problems += [f"{name}=={version}: no wheel in {folder}" for name, version in pins.items() if name not in found]
    total = sum(size for _, size in sizes)
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / MIB:.1f} MiB of wheels: over the {MAX_TOTAL_BYTES / MIB:.0f} MiB budget")
    return problems, sizes


def main(argv: list[str]) -> int:
    if argv == ["platforms"]:
        print(" ".join(PLATFORMS))
        return 0
    if argv == ["check"]:
        problems = list_problems()
    elif len(argv) == 2 and argv[0] == "check-folder":
        problems, sizes = folder_problems(Path(argv[1]))
        for name, size in sizes:
            print(f"{size / MIB:8.2f} MiB  {name}")
        print(f"{sum(s for _, s in sizes) / MIB:8.2f} MiB  total, {len(sizes)} wheels "
              f"(budget {MAX_TOTAL_BYTES / MIB:.0f} MiB)")
    else:
        print("usage: device_wheels.py check | platforms | check-folder DIR", file=sys.stderr)
        return 2
    for line in problems:
        print(f"device_wheels: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
