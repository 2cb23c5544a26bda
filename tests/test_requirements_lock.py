"""requirements.lock: exact versions of every package, consistent with pyproject.toml and with this environment."""

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def read_lock(text: str) -> dict[str, Version]:
    """{canonical name: version} of a lock; every line a comment or `name==version`."""
    pins = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep or any(c in line for c in "<>~!;@ "):
            raise ValueError(f"requirements.lock:{number}: {line!r} is not an exact name==version pin")
        pins[canonicalize_name(name)] = Version(version)
    return pins


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def disagreements(pins: dict[str, Version], requirements: list[Requirement]) -> list[str]:
    """Requirements of pyproject.toml the lock leaves out or pins at a version they exclude."""
    problems = []
    for req in requirements:
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req} is not in requirements.lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req} but requirements.lock pins {pinned}")
    return problems


def test_every_line_of_the_lock_is_an_exact_pin():
    pins = read_lock(LOCK.read_text())
    assert {"torch", "transformers", "trl", "lightning", "prefect", "mlflow", "pip", "setuptools"} <= set(pins)
    with pytest.raises(ValueError, match="not an exact"):
        read_lock("transformers>=5\n")


def test_pyproject_and_lock_agree():
    assert disagreements(read_lock(LOCK.read_text()), pyproject_requirements()) == []


def test_the_check_catches_a_pyproject_the_lock_does_not_satisfy():
    pins = read_lock(LOCK.read_text())
    assert disagreements(pins, [Requirement("transformers<5")]) == [
        f"transformers<5 but requirements.lock pins {pins['transformers']}"
    ]
    assert disagreements(pins, [Requirement("no-such-package-dsv3")]) == ["no-such-package-dsv3 is not in requirements.lock"]


def test_the_lock_holds_every_transitive_dependency():
    """Each locked package's own requirements (for this platform, no extras) are locked at versions they accept."""
    pins = read_lock(LOCK.read_text())
    environment = default_environment() | {"extra": ""}
    problems = []
    for name in pins:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # reported by the environment test
        needed = [Requirement(r) for r in requires]
        needed = [r for r in needed if r.marker is None or r.marker.evaluate(environment)]
        problems += [f"{name} needs {p}" for p in disagreements(pins, needed)]
    assert problems == []


def test_this_environment_is_the_lock():
    """`make setup` installed exactly the lock (a GPU user's torch build differs only in its local label and adds
    the CUDA packages torch itself requires)."""
    pins = read_lock(LOCK.read_text())
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version)
        for d in metadata.distributions()
        if canonicalize_name(d.metadata["Name"]) != "dsv3"
    }
    torch_needs = {canonicalize_name(Requirement(r).name) for r in metadata.requires("torch") or []}
    differ = {
        name: (str(pins.get(name)), str(installed.get(name)))
        for name in set(pins) | set(installed)
        if pins.get(name) != installed.get(name)
        and not (name == "torch" and pins[name].public == installed[name].public)
        and not (name not in pins and name in torch_needs)
    }
    assert differ == {}, "the environment differs from requirements.lock (locked, installed); rerun make setup"
