"""docker/Dockerfile and pyproject.toml must agree on vllm, ray and deepspeed.

The Dockerfile pins exact versions (`FROM vllm/vllm-openai:vX`, `"pkg==X"` in a pip install);
pyproject pins or admits ranges. Each Dockerfile pin must be admitted by pyproject's specifier,
and the base image's tag must equal the `vllm` extra's pin, so bumping one side alone fails here.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("vllm", "ray", "deepspeed")


def dockerfile_pins(text: str) -> dict[str, Version]:
    """{"base:vllm": tag version, "vllm"/"ray"/"deepspeed": "==" pins quoted in RUN lines}."""
    text = re.sub(r"#.*", "", text)  # comments may mention other versions
    base = re.findall(r"^FROM\s+vllm/vllm-openai:v(\S+)", text, flags=re.M)
    if len(base) != 1:
        raise AssertionError(f"expected one `FROM vllm/vllm-openai:vX.Y.Z`, found {base}")
    pins = {"base:vllm": Version(base[0])}
    for spec in re.findall(r'"([A-Za-z0-9_.\-\[\],]+==[^"\s]+)"', text):
        req = Requirement(spec)
        if req.name in pins:
            raise AssertionError(f"{req.name} pinned twice in the Dockerfile")
        pins[req.name] = Version(next(iter(req.specifier)).version)
    return pins


def pyproject_specs(text: str) -> dict[str, Requirement]:
    project = tomllib.loads(text)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {r.name: r for r in reqs if r.name in PINNED}


def mismatches(dockerfile: str, pyproject: str) -> list[str]:
    pins, specs = dockerfile_pins(dockerfile), pyproject_specs(pyproject)
    problems = [f"{name} is not pinned in the Dockerfile" for name in PINNED if name not in pins]
    problems += [f"{name} is missing from pyproject.toml" for name in PINNED if name not in specs]
    for name in PINNED:
        if name in pins and name in specs and not specs[name].specifier.contains(pins[name], prereleases=True):
            problems.append(f"Dockerfile {name}=={pins[name]} is outside pyproject's {specs[name]}")
    if "vllm" in pins and pins["base:vllm"] != pins["vllm"]:
        problems.append(f"base image vllm-openai:v{pins['base:vllm']} != pinned vllm=={pins['vllm']}")
    if "vllm" in specs and not specs["vllm"].specifier.contains(pins["base:vllm"], prereleases=True):
        problems.append(f"base image vllm-openai:v{pins['base:vllm']} is outside pyproject's {specs['vllm']}")
    if "ray" in specs and "default" not in specs["ray"].extras:
        problems.append("pyproject must require ray[default] (dashboard + job API for `ray job submit`)")
    return problems


DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def test_repository_pins_agree():
    assert mismatches(DOCKERFILE, PYPROJECT) == []


def test_dockerfile_pins_parsed():
    pins = dockerfile_pins(DOCKERFILE)
    assert pins == {"base:vllm": Version("0.26.0"), "vllm": Version("0.26.0"),
                    "ray": Version("2.60.0"), "deepspeed": Version("0.19.8")}
    assert '"ray[default]==' in DOCKERFILE


def test_vllm_extra_is_an_exact_pin():
    # the image's vLLM is fixed by its tag, so pyproject must pin one version, not a range
    (spec,) = pyproject_specs(PYPROJECT)["vllm"].specifier
    assert spec.operator == "=="


# The checker itself, on modified copies: bumping either side alone must be caught.
@pytest.mark.parametrize("old, new, side, expect", [
    ("vllm/vllm-openai:v0.26.0", "vllm/vllm-openai:v0.27.0", "docker", "base image vllm-openai:v0.27.0"),
    ('"vllm==0.26.0"', '"vllm==0.26.1"', "docker", "vllm==0.26.1 is outside"),
    ('"ray[default]==2.60.0"', '"ray[default]==2.61.0"', "docker", "ray==2.61.0 is outside"),
    ('"deepspeed==0.19.8"', '"deepspeed==0.19.7"', "docker", "deepspeed==0.19.7 is outside"),
    (' "deepspeed==0.19.8"', "", "docker", "deepspeed is not pinned"),
    ('"vllm==0.26.0"', '"vllm==0.27.0"', "pyproject", "vllm==0.26.0 is outside"),
    ('"ray[default]>=2.60,<2.61"', '"ray[default]>=2.61,<2.62"', "pyproject", "ray==2.60.0 is outside"),
    ('"deepspeed>=0.19.8,<0.20"', '"deepspeed>=0.20,<0.21"', "pyproject", "deepspeed==0.19.8 is outside"),
    ('"ray[default]>=2.60,<2.61"', '"ray>=2.60,<2.61"', "pyproject", "ray[default]"),
])
def test_one_sided_bump_is_caught(old, new, side, expect):
    source = DOCKERFILE if side == "docker" else PYPROJECT
    assert old in source, f"fixture out of date: {old!r} not in the {side} file"
    modified = source.replace(old, new)
    docker, pyproject = (modified, PYPROJECT) if side == "docker" else (DOCKERFILE, modified)
    problems = mismatches(docker, pyproject)
    assert any(expect in p for p in problems), problems


def test_bumping_both_sides_together_passes():
    docker = (DOCKERFILE.replace("vllm-openai:v0.26.0", "vllm-openai:v0.27.0")
              .replace('"vllm==0.26.0"', '"vllm==0.27.0"'))
    pyproject = PYPROJECT.replace('"vllm==0.26.0"', '"vllm==0.27.0"')
    assert mismatches(docker, pyproject) == []
