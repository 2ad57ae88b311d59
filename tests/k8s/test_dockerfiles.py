"""The Dockerfiles, checked by reading them (no Docker engine here): the essentials that make the image
work under KubeRay are asserted instruction by instruction.

* the base is Ray 2.60 for Python 3.11 (``-gpu`` for the GPU image), the same Ray as ``rayVersion``;
* torch is pinned and installed before the package, and held by a constraint while the package
  installs, so pip cannot swap it;
* the package (``zipvl_ray`` and ``deployments``) is installed, not editable, into the base image's
  Python, where the head's dashboard imports the app, router and policy modules;
* nothing downloads a model at build time;
* the GPU image has flash-attn built against that torch;
* the manifests run the tags these files build.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from zipvl_ray import k8s

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, ARG defaults substituted."""

    keyword: str
    arguments: str
    line: int


def parse(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile (``${ARG}`` replaced by the ARG's default where one is declared)."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.startswith("#"):
            continue  # a comment between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split()), start))
        pending = ""
    defaults = {}
    resolved = []
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            defaults[name] = value
        text = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), instruction.arguments)
        resolved.append(Instruction(instruction.keyword, text, instruction.line))
    return resolved


def shell_commands(script: str) -> list[list[str]]:
    """The words of each command of a shell line, split at ``&&``, ``||``, ``;`` and ``|`` (quotes kept)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def pip_installs(instructions: list[Instruction]) -> list[tuple[int, list[str]]]:
    """``(instruction index, command words)`` of every ``pip install`` in RUN instructions.

    Leading ``NAME=value`` environment assignments are dropped: the words start at the program.
    """
    found = []
    for index, instruction in enumerate(instructions):
        if instruction.keyword != "RUN":
            continue
        for words in shell_commands(instruction.arguments):
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words = words[1:]
            if "pip" in words[:3] and "install" in words:
                found.append((index, words))
    return found


def first_index(installs, predicate) -> int:
    return next(index for index, words in installs if predicate(words))


def installs_the_package(words: list[str]) -> bool:
    return any(re.fullmatch(r"\.(\[[\w,]+\])?", word) for word in words)


def constraints(run: str) -> set[str]:
    """The lines a RUN writes with ``printf '<format>' args... > /tmp/constraints.txt``."""
    match = re.search(r"printf '([^']*)' (.*?) > /tmp/constraints.txt", run)
    assert match, run
    values = shlex.split(match.group(2))
    return set(match.group(1).replace("%s", "{}").format(*values).split("\\n")) - {""}


DOCKERFILES = [
    ("Dockerfile", "rayproject/ray:2.60.0-py311", k8s.CPU_VARIANT),
    ("Dockerfile.gpu", "rayproject/ray:2.60.0-py311-gpu", k8s.GPU_VARIANT),
]
IDS = [name for name, _, _ in DOCKERFILES]
TORCH_PIN = "torch==2.13.0"


@pytest.mark.parametrize("name, base, variant", DOCKERFILES, ids=IDS)
def test_base_is_ray_2_60_for_python_3_11(name, base, variant):
    instructions = parse(REPO_ROOT / name)
    froms = [i.arguments for i in instructions if i.keyword == "FROM"]
    assert froms == [base]
    assert base.split(":")[1].startswith(k8s.RAY_VERSION)
    python = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">=3.11"


@pytest.mark.parametrize("name, base, variant", DOCKERFILES, ids=IDS)
def test_torch_is_pinned_and_installed_before_the_package(name, base, variant):
    instructions = parse(REPO_ROOT / name)
    installs = pip_installs(instructions)
    torch_at = first_index(installs, lambda words: any(w.startswith("torch") for w in words))
    package_at = first_index(installs, installs_the_package)
    assert torch_at < package_at
    torch_words = next(words for index, words in installs if index == torch_at)
    assert TORCH_PIN in torch_words, torch_words
    # While the package installs, a constraints file holds torch and ray where they are.
    package_run = instructions[package_at].arguments
    package_words = next(words for index, words in installs if index == package_at)
    assert package_words[package_words.index("--constraint") + 1] == "/tmp/constraints.txt"
    assert {TORCH_PIN, f"ray=={k8s.RAY_VERSION}"} <= constraints(package_run)


@pytest.mark.parametrize("name, base, variant", DOCKERFILES, ids=IDS)
def test_the_package_goes_into_the_image_python(name, base, variant):
    instructions = parse(REPO_ROOT / name)
    runs = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    for words in (words for _, words in pip_installs(instructions)):
        assert words[0] == "python" and words[1:3] == ["-m", "pip"], words  # the base image's own Python
        assert not {"-e", "--editable", "--target", "--prefix", "--user"} & set(words), words
    assert "venv" not in runs and "virtualenv" not in runs and "conda create" not in runs
    # What `pip install .` installs: both top-level packages the serve config imports.
    include = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]
    assert {"zipvl_ray*", "deployments*"} <= set(include["include"])
    copied = {
        i.arguments.split()[-2] for i in instructions if i.keyword == "COPY" and "--from" not in i.arguments
    }
    assert {"zipvl_ray", "deployments", "configs"} <= copied
    # The build proves the configs' import paths (app, router, policy) resolve in the image.
    assert any(
        i.arguments.startswith("python -m zipvl_ray.k8s imports") for i in instructions if i.keyword == "RUN"
    )


@pytest.mark.parametrize("name, base, variant", DOCKERFILES, ids=IDS)
def test_no_model_is_downloaded_at_build(name, base, variant):
    instructions = parse(REPO_ROOT / name)
    runs = " ".join(i.arguments for i in instructions if i.keyword == "RUN").lower()
    for forbidden in (
        "snapshot_download",
        "hf_hub_download",
        "from_pretrained",
        "huggingface-cli",
        "hf download",
    ):
        assert forbidden not in runs
    env = " ".join(i.arguments for i in instructions if i.keyword == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    # Offline is set before the first RUN that could import transformers.
    env_at = next(
        n for n, i in enumerate(instructions) if i.keyword == "ENV" and "HF_HUB_OFFLINE=1" in i.arguments
    )
    first_package_run = first_index(pip_installs(instructions), installs_the_package)
    assert env_at < first_package_run


def test_gpu_image_builds_flash_attn_against_the_pinned_torch():
    instructions = parse(REPO_ROOT / "Dockerfile.gpu")
    installs = pip_installs(instructions)
    torch_at = first_index(installs, lambda words: TORCH_PIN in words)
    flash_at, flash_words = next(
        (index, words) for index, words in installs if any(w.startswith("flash-attn==") for w in words)
    )
    assert torch_at < flash_at and "--no-build-isolation" in flash_words
    package_run = instructions[first_index(installs, installs_the_package)].arguments
    assert ".[flash,otlp]" in package_run
    assert any(line.startswith("flash-attn==") for line in constraints(package_run))  # held too
    cpu_runs = " ".join(i.arguments for i in parse(REPO_ROOT / "Dockerfile") if i.keyword == "RUN")
    assert "flash-attn" not in cpu_runs and "download.pytorch.org/whl/cpu" in cpu_runs


@pytest.mark.parametrize("name, base, variant", DOCKERFILES, ids=IDS)
def test_manifests_run_the_tag_each_dockerfile_documents(name, base, variant):
    manifest = yaml.safe_load((REPO_ROOT / variant.output).read_text())
    images = {
        group["template"]["spec"]["containers"][0]["image"]
        for group in [
            manifest["spec"]["rayClusterConfig"]["headGroupSpec"],
            *manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"],
        ]
    }
    (image,) = images
    assert f"-t {image}" in (REPO_ROOT / name).read_text()  # the build command in the file's header


def test_dockerignore_sends_only_what_the_dockerfiles_copy():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # an allowlist: .venv, .git, data and anything new stay out
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for name, _, _ in DOCKERFILES:
        for instruction in parse(REPO_ROOT / name):
            if instruction.keyword == "COPY":
                for source in instruction.arguments.split()[:-1]:
                    if not source.startswith("--"):
                        assert source in allowed, (
                            f"{name}:{instruction.line} copies {source}, not in the context"
                        )
                        assert (REPO_ROOT / source).exists()
    assert not {".venv", ".git", "k8s", "tests"} & allowed


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "FROM a:1\nARG V=2\nRUN echo ${V} \\\n  && true\n",
            [("FROM", "a:1"), ("ARG", "V=2"), ("RUN", "echo 2 && true")],
        ),
        ("# c\nRUN a \\\n# inner comment\n  b\n", [("RUN", "a b")]),
        ("RUN echo ${UNSET}\n", [("RUN", "echo ${UNSET}")]),
    ],
)
def test_parser(tmp_path, text, expected):
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    assert [(i.keyword, i.arguments) for i in parse(path)] == expected
