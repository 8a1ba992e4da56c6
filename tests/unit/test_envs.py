"""The conda environments for cluster runs (`snakemake --sdm conda`) agree with the
project's own pinned requirements, and every rule uses one.

Conda cannot solve environments on the project machines (no conda channels), so
this checks the files themselves: they parse, pin through pip exactly what
pyproject.toml pins, and every rule's `conda:` points at an existing file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVS_DIR = REPO_ROOT / "envs"
RULES_DIR = REPO_ROOT / "workflow" / "rules"
ENV_FILES = sorted(ENVS_DIR.glob("*.yaml")) + sorted(ENVS_DIR.glob("*.yml"))
RULE_FILES = sorted(RULES_DIR.glob("*.smk"))
# A top-level rule or checkpoint header: `rule name:` / `checkpoint name:`.
RULE_HEADER = re.compile(r"^(rule|checkpoint)\s+(\w+)\s*:", re.MULTILINE)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)$")


def canonical(name: str) -> str:
    """PEP 503 name normalisation: PyYAML, pyyaml and py_yaml are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(requirements: list[str], where: str) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        assert match, f"{where}: {requirement!r} is not pinned as name==version"
        name = canonical(match.group(1))
        assert name not in pins, f"{where}: {match.group(1)} is pinned twice"
        pins[name] = match.group(2)
    return pins


def project_pins() -> dict[str, str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return parse_pins(project["dependencies"], "pyproject.toml [project].dependencies")


def load_env(path: Path) -> dict:
    with open(path) as handle:
        env = yaml.safe_load(handle)
    assert isinstance(env, dict), f"{path.name}: not a YAML mapping"
    return env


def pip_section(env: dict, path: Path) -> list[str]:
    sections = [dep["pip"] for dep in env.get("dependencies") or [] if isinstance(dep, dict) and "pip" in dep]
    assert len(sections) == 1, f"{path.name}: expected one `pip:` list under dependencies, found {len(sections)}"
    assert all(isinstance(entry, str) for entry in sections[0]), f"{path.name}: pip entries must be strings"
    return sections[0]


def is_local_install(entry: str) -> bool:
    """`-e ../`, `--editable=.`, `./pkg`, `file://...`: the project itself, not a PyPI pin."""
    entry = entry.strip()
    return entry.startswith(("-e", "--editable", ".", "/", "file:", "$")) or "@ file:" in entry


def local_install_target(entry: str) -> str:
    entry = entry.strip()
    for prefix in ("--editable=", "--editable", "-e"):
        if entry.startswith(prefix):
            return entry[len(prefix):].strip()
    return entry


def rule_blocks(text: str) -> dict[str, str]:
    """rule name -> its text (header to the next top-level statement)."""
    blocks = {}
    headers = list(RULE_HEADER.finditer(text))
    for header in headers:
        body = []
        for line in text[header.end():].splitlines()[1:]:
            if line.strip() and not line[0].isspace():
                break  # next top-level statement
            body.append(line)
        blocks[header.group(2)] = "\n".join(body)
    return blocks


def conda_env_constant() -> str:
    common = (RULES_DIR / "common.smk").read_text()
    match = re.search(r'^CONDA_ENV\s*=\s*["\']([^"\']+)["\']', common, re.MULTILINE)
    assert match, "workflow/rules/common.smk does not define CONDA_ENV = '<path>'"
    return match.group(1)


def test_there_are_environment_and_rule_files():
    assert ENV_FILES, f"no conda environment files in {ENVS_DIR}"
    assert RULE_FILES, f"no rule files in {RULES_DIR}"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_environment_parses_and_installs_python_and_pip(path):
    env = load_env(path)
    dependencies = env.get("dependencies")
    assert isinstance(dependencies, list) and dependencies, f"{path.name}: no dependencies"
    conda_specs = [dep for dep in dependencies if isinstance(dep, str)]
    assert "pip" in [re.split(r"[=<>! ]", spec)[0] for spec in conda_specs], f"{path.name}: conda package pip missing"
    pythons = [spec for spec in conda_specs if re.split(r"[=<>! ]", spec)[0] == "python"]
    assert pythons, f"{path.name}: no python version"
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        requires_python = tomllib.load(handle)["project"]["requires-python"]
    # requires-python is ">=3.11,<3.12": the environment's Python must be 3.11.
    minor = re.search(r">=\s*(\d+\.\d+)", requires_python).group(1)
    assert all(re.fullmatch(rf"python\s*=?=\s*{re.escape(minor)}(\.\*|\.\d+)?", spec) for spec in pythons), (
        f"{path.name}: {pythons} does not match requires-python {requires_python!r}"
    )
    assert pip_section(env, path), f"{path.name}: empty pip list"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_environment_pins_exactly_what_pyproject_pins(path):
    entries = pip_section(load_env(path), path)
    pins = parse_pins([entry for entry in entries if not is_local_install(entry)], path.name)
    expected = project_pins()
    missing = {name: version for name, version in expected.items() if name not in pins}
    different = {name: (pins[name], version) for name, version in expected.items()
                 if name in pins and pins[name] != version}
    extra = sorted(set(pins) - set(expected))
    assert not missing, f"{path.name}: pyproject pins missing from the environment: {missing}"
    assert not different, f"{path.name}: versions differ (environment, pyproject): {different}"
    assert not extra, f"{path.name}: pins not in pyproject.toml's dependencies: {extra}"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_environment_installs_the_project_without_a_path_relative_to_itself(path):
    """Snakemake copies the environment file to <workdir>/.snakemake/conda/<hash>.yaml
    and runs `conda env create --file` on that copy; conda runs pip in the copy's
    folder. A relative `-e ../` then points at <workdir>/.snakemake/, not at the
    project, so the environment cannot be built there."""
    local = [entry for entry in pip_section(load_env(path), path) if is_local_install(entry)]
    assert local, f"{path.name}: the environment does not install the cacflow package itself"
    for entry in local:
        target = local_install_target(entry).removeprefix("file://")
        assert not target.startswith("."), (
            f"{path.name}: {entry!r} is relative to the environment file's folder, but Snakemake builds "
            "the environment from a copy in .snakemake/conda/; use an absolute location "
            "(e.g. ${CACFLOW_ROOT} set by the Snakefile to workflow.basedir) or install cacflow another way"
        )


def test_conda_env_of_the_rules_is_an_existing_environment_file():
    target = (RULES_DIR / conda_env_constant()).resolve()
    assert target.is_file(), f"CONDA_ENV resolves to {target}, which does not exist"
    assert target.parent == ENVS_DIR.resolve(), f"CONDA_ENV resolves to {target}, outside envs/"
    assert target in [p.resolve() for p in ENV_FILES]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_every_rule_declares_a_conda_environment(path):
    text = path.read_text()
    blocks = rule_blocks(text)
    if path.name != "common.smk":
        assert blocks, f"{path.name}: no rules found"
    for rule, body in blocks.items():
        if not re.search(r"^\s+(shell|run|script|notebook|wrapper):", body, re.MULTILINE):
            assert "conda:" not in body, f"{path.name}: rule {rule} runs nothing, so needs no `conda:`"
            continue  # a target rule (e.g. `evaluate`): it only asks for other rules' outputs
        match = re.search(r"^\s+conda:\s*\n\s+(\S.*?)\s*,?\s*$|^\s+conda:\s*(\S.*?)\s*,?\s*$", body, re.MULTILINE)
        assert match, f"{path.name}: rule {rule} has no `conda:` directive"
        value = (match.group(1) or match.group(2)).rstrip(",")
        if value == "CONDA_ENV":
            continue
        literal = re.fullmatch(r"[\"']([^\"']+)[\"']", value)
        assert literal, f"{path.name}: rule {rule}: conda: {value!r} is neither CONDA_ENV nor a path"
        assert (RULES_DIR / literal.group(1)).resolve().is_file(), (
            f"{path.name}: rule {rule}: conda: {literal.group(1)} does not exist relative to workflow/rules/"
        )
