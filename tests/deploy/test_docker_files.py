"""No docker engine here: check the images' Dockerfiles statically.

The sidecar image must be the core install only: the dependencies of
pyproject.toml's [project] table (which hold no TensorFlow), and the sidecar
package, which must import nothing outside it and those dependencies.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from sidecar.config import Settings, env_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HEAVY = ("tensorflow", "tensorflow-serving-api", "tensorflow-cpu", "tf-keras", "keras", "jupyterlab", "papermill",
         "adversarial-robustness-toolbox", "scipy", "scikit-learn", "pandas", "matplotlib")


def _dist(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest))
            buf = ""
    return out


def _final_stage(instructions):
    last = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    return instructions[last:]


@pytest.mark.parametrize("name", ["Dockerfile.sidecar", "Dockerfile.serving"])
def test_dockerfiles_are_well_formed(name):
    ins = _instructions((DOCKER / name).read_text())
    words = [w for w, _ in ins]
    assert words[0] == "FROM"
    assert "ENTRYPOINT" in words
    final = _final_stage(ins)
    users = [arg.split()[0] for w, arg in final if w == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    for w, arg in ins:
        if w == "COPY" and not arg.startswith("--from"):
            *sources, _dest = arg.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name} copies missing {src}"
        if w == "ENV":
            for var in re.findall(r"\b(HASHGUARD_\w+)=", arg):
                known = {env_name(f) for f in Settings.__dataclass_fields__}
                assert var in known, f"{name} sets {var}, which is no sidecar setting"


def test_core_dependencies_hold_no_tensorflow_and_extras_do():
    core = {_dist(r) for r in PROJECT["dependencies"]}
    assert not core & set(HEAVY), f"the core install (the sidecar) pulls in {sorted(core & set(HEAVY))}"
    extras = PROJECT["optional-dependencies"]
    assert {"tensorflow", "tensorflow-serving-api"} <= {_dist(r) for r in extras["serving"]}
    assert any(_dist(r) == "hashguard" and "serving" in r for r in extras["research"]), "research must include serving"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*-e '\.\[serving,research,dev\]'", makefile), "make must install every extra"


def test_sidecar_image_is_the_core_install_only():
    text = (DOCKER / "Dockerfile.sidecar").read_text()
    ins = _instructions(text)
    copied = [arg.split()[:-1] for w, arg in ins if w == "COPY" and not arg.startswith("--from")]
    sources = {s.rstrip("/") for srcs in copied for s in srcs}
    assert sources <= {"pyproject.toml", "sidecar"}, f"the sidecar image copies {sorted(sources)}"
    assert "serving" not in sources and not any(s.startswith("workbooks") for s in sources)
    runs = " ".join(arg for w, arg in ins if w == "RUN")
    assert "['project']['dependencies']" in runs and "optional-dependencies" not in runs
    assert "tensorflow" not in runs.lower()
    exposed = {p for w, arg in _final_stage(ins) if w == "EXPOSE" for p in arg.split()}
    assert {"8600", "8601", "9600"} <= exposed
    health = [arg for w, arg in _final_stage(ins) if w == "HEALTHCHECK"]
    assert health and "grpc_health" in health[0] and "127.0.0.1:8600" in health[0] and "SERVING" in health[0]
    assert "hashguard-sidecar" in text


def _third_party_imports(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_sidecar_imports_only_itself_and_core_dependencies():
    """What the image copies (sidecar/) and installs (the core list) is all the sidecar imports."""
    imports = _third_party_imports(REPO / "sidecar")
    assert "serving" not in imports and "lab" not in imports, "the sidecar must not import serving/ or the lab"
    assert not any(m.startswith("tensorflow") for m in imports), {m: imports[m] for m in imports if "tensorflow" in m}
    core = {_dist(r) for r in PROJECT["dependencies"]}
    by_module = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in imports.items():
        if module == "sidecar":
            continue
        dists = {d.lower().replace("_", "-") for d in by_module.get(module, [])}
        if not dists & core:
            missing[module] = sorted(where)[:3]
    assert not missing, f"sidecar imports modules no core dependency provides: {missing}"


def test_serving_image_has_serving_deps_and_not_the_sidecar_or_lab():
    ins = _instructions((DOCKER / "Dockerfile.serving").read_text())
    sources = {s.rstrip("/") for w, arg in ins if w == "COPY" and not arg.startswith("--from") for s in arg.split()[:-1]}
    assert "serving" in sources and "sidecar" not in sources and not any(s.startswith("workbooks") for s in sources)
    runs = " ".join(arg for w, arg in ins if w == "RUN")
    assert "['optional-dependencies']['serving']" in runs
    imports = _third_party_imports(REPO / "serving")
    assert "sidecar" not in imports and "lab" not in imports, "serving/ must stand alone in its image"


def test_compose_builds_the_sidecar_from_this_dockerfile():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    built = [s for s in services.values() if isinstance(s.get("build"), dict)
             and Path(s["build"]["dockerfile"]).name == "Dockerfile.sidecar"]
    assert built, "compose.yaml has no service built from docker/Dockerfile.sidecar"
    exposed = {p for w, arg in _final_stage(_instructions((DOCKER / "Dockerfile.sidecar").read_text()))
               if w == "EXPOSE" for p in arg.split()}
    for svc in built:
        assert {str(p) for p in svc.get("expose", [])} <= exposed


def test_every_package_of_the_sidecar_and_serving_is_in_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for top in ("sidecar", "serving"):
        for init in (REPO / top).rglob("__init__.py"):
            dotted = ".".join(init.parent.relative_to(REPO).parts)
            assert dotted in listed, f"{dotted} is missing from [tool.setuptools] packages in pyproject.toml"
