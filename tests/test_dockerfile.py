"""Static checks of the Dockerfile: pinned base, the megatron-core pin of pyproject.toml, NGC torch kept."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def instructions():
    """(INSTRUCTION, argument) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in _read("Dockerfile").splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_base_image_is_pinned_ngc_pytorch():
    bases = [arg for kind, arg in instructions() if kind == "FROM"]
    assert len(bases) == 1
    image, _, tag = bases[0].split()[0].partition(":")
    assert image == "nvcr.io/nvidia/pytorch"
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), f"base tag {tag!r} is not a pinned NGC release"


def test_megatron_core_pin_matches_pyproject():
    pyproject = re.search(r'"megatron-core==([\d.]+)"', _read("pyproject.toml")).group(1)
    runs = " ".join(arg for kind, arg in instructions() if kind == "RUN")
    assert re.findall(r"megatron-core==([\d.]+)", runs) == [pyproject]


def test_torch_not_installed_over_the_base_image():
    for kind, arg in instructions():
        if kind != "RUN":
            continue
        for command in re.split(r"&&|;", arg):
            words = command.split()
            if "pip" in words and "install" in words:
                packages = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
                assert not any(re.match(r"torch([<>=!~\[]|$)", p) for p in packages), command
                if "." in packages or "-e" in words:
                    assert "--no-deps" in words, f"the project install may pull another torch: {command}"


def test_every_pip_package_is_pinned():
    for kind, arg in instructions():
        for command in re.split(r"&&|;", arg) if kind == "RUN" else []:
            words = command.split()
            if "pip" in words and "install" in words:
                packages = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
                assert all(p == "." or "==" in p for p in packages), command


def test_no_healthcheck_no_upgrade_no_latest_and_non_root_user():
    kinds = [kind for kind, _ in instructions()]
    assert "HEALTHCHECK" not in kinds
    text = _read("Dockerfile")
    assert "apt-get upgrade" not in text and ":latest" not in text
    users = [arg.strip() for kind, arg in instructions() if kind == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerignore_keeps_the_context_small():
    ignored = _read(".dockerignore").split()
    for entry in (".git", ".venv", "tests", "runs"):
        assert entry in ignored
