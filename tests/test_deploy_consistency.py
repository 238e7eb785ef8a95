"""The code, the documentation (docs/, README.md), the Dockerfile and docker-compose.yml agree on the environment.

- Every variable the code reads (config.py's `_str/_bool/_number(env, "NAME", ...)` and `env.get("NAME")`, and any
  literal os.environ / os.getenv read in the product's *.py) is in docs/configuration.md's table, and nothing else
  is; the README's short table of common settings states the same defaults.
- Setting a variable to the default the documentation states, or the one the compose file states, changes nothing:
  `Settings.from_env({NAME: that})` equals the defaults. So a default can't drift in one place only.
- The Dockerfile's ENV agrees with the documentation except the container paths docs/docker.md states;
  docker-compose.yml passes every variable that makes sense in a container, each interpolating its own name.
- The documentation site: mkdocs.yml's nav lists every page of docs/, the build is strict, README's links resolve.
- Structure the issue asks for: pinned base image and Label Studio tag, build-time weights from the manifest,
  non-root user, HEALTHCHECK on /health, gunicorn without --preload, offline hub, the GPU reservation.

No Docker engine is needed (CI has none); `make lint` runs hadolint and `docker-compose config` on the same files.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import weights
from config import GROUNDINGDINO_PACKAGED_CONFIG, SAM3_PACKAGED_TOKENIZER, ServerSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICE = "grounded-sam"

# Set by the image to paths inside it (documented in docs/docker.md); every other ENV must equal the documented default.
CONTAINER_OVERRIDES = {"MODEL_DIR": "/models", "DATA_DIR": "/data",
                       "GROUNDINGDINO_TEXT_ENCODER": "/models/bert-base-uncased"}
# Read by the code but deliberately not in the compose file (the image fixes them; see the comment there).
NOT_IN_COMPOSE = {"HOST", "PORT"}
# Read by the code with "unset" meaning something else than "empty": the compose file only passes them through.
UNSET_MATTERS = {"DEFAULT_PROMPT"}


# ---------------------------------------------------------------------------------------------- sources

def config_variables() -> set[str]:
    """Names config.py reads: `_str/_bool/_number(env, "NAME", ...)` and `env.get("NAME")`."""
    tree = ast.parse((ROOT / "config.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("_str", "_bool", "_number", "_choice") and len(node.args) >= 2:
            key = node.args[1]
            if isinstance(key, ast.Name) and key.id == "name":
                continue  # _choice calling _str
        elif (isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name)
              and func.value.id == "env"):
            key = node.args[0]
            if isinstance(key, ast.Name) and key.id == "name":
                continue  # inside the _str/_bool/_number helpers themselves
        else:
            continue
        assert isinstance(key, ast.Constant) and isinstance(key.value, str), ast.dump(node)
        names.add(key.value)
    return names


def environ_reads(path: Path) -> set[str]:
    """Literal keys read from os.environ / os.getenv in a module (os.environ.get("X"), os.environ["X"], ...)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()

    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
            and node.value.id == "os"

    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") and is_environ(func.value):
                key = node.args[0]
            elif isinstance(func, ast.Attribute) and func.attr == "getenv" and isinstance(func.value, ast.Name) \
                    and func.value.id == "os":
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and is_environ(node.value) and isinstance(node.ctx, ast.Load):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def product_modules() -> list[Path]:
    return sorted(p for p in ROOT.glob("*.py"))


def page(name: str) -> str:
    """A page of the documentation: docs/<name>."""
    return (DOCS / name).read_text(encoding="utf-8")


def variable_rows(text: str, where: str) -> dict[str, str]:
    """variable -> default cell of the `| `NAME` | default | meaning |` rows of a table in `text`."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`([A-Z0-9_]+)`\s*\|([^|]*)\|", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is in {where}'s table twice"
            rows[match.group(1)] = match.group(2).strip()
    return rows


def documented_table() -> dict[str, str]:
    """variable -> default cell of docs/configuration.md's table (the one list of every variable)."""
    return variable_rows(page("configuration.md"), "docs/configuration.md")


def readme_default(cell: str) -> str | None:
    """The value a documented default cell stands for; None for *(unset)*."""
    if cell == "*(unset)*":
        return None
    if cell == "*(empty)*":
        return ""
    if "the package's" in cell:
        return GROUNDINGDINO_PACKAGED_CONFIG
    if cell.startswith("open_clip_torch's"):
        return SAM3_PACKAGED_TOKENIZER
    match = re.match(r"`([^`]*)`", cell)
    assert match, f"documented default {cell!r} is neither *(empty)*, *(unset)* nor a `value`"
    return match.group(1).replace("$MODEL_DIR", Settings().model_dir)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                instruction, _, rest = current.strip().partition(" ")
                lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            for token in shlex.split(rest):
                name, sep, value = token.partition("=")
                assert sep, f"ENV {rest!r}: use the NAME=value form"
                env[name] = value
    return env


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG":
            name, _, value = shlex.split(rest)[0].partition("=")
            args[name] = value
    return args


def compose_environment(service: str = SERVICE) -> dict[str, str | None]:
    """NAME -> the compose file's text for it ("${NAME:-default}"), or None for a bare pass-through NAME."""
    env = COMPOSE["services"][service]["environment"]
    assert isinstance(env, list), "write environment as a list of NAME=value (one style, parsed here)"
    out = {}
    for item in env:
        name, sep, value = item.partition("=")
        assert name not in out, f"{name} is in the compose environment twice"
        out[name] = value if sep else None
    return out


def compose_default(name: str, text: str) -> str:
    match = re.fullmatch(r"\$\{([A-Z0-9_]+):-([^}]*)\}", text)
    assert match, f"compose: {name}={text}: write it as ${{{name}:-default}}"
    assert match.group(1) == name, f"compose: {name} interpolates another variable, {match.group(1)}"
    return match.group(2)


CODE_VARIABLES = config_variables()


def settings(env: dict) -> tuple:
    return Settings.from_env(env), ServerSettings.from_env(env)


# ---------------------------------------------------------------------------------------------- code and docs

def test_config_parsing_finds_the_variables():
    assert {"USE_SAM", "SAM_CHECKPOINT", "BOX_THRESHOLD", "DEFAULT_PROMPT", "LABEL_STUDIO_HOST", "WORKERS",
            "PORT"} <= CODE_VARIABLES
    assert len(CODE_VARIABLES) >= 30


def test_config_py_is_the_only_module_that_reads_the_environment():
    for path in product_modules():
        reads = environ_reads(path)
        assert not reads, f"{path.name} reads {sorted(reads)} from os.environ: read them in config.py instead"


def test_every_variable_the_code_reads_is_documented_and_nothing_else():
    table = documented_table()
    assert CODE_VARIABLES - table.keys() == set(), "read by config.py, missing from docs/configuration.md's table"
    assert table.keys() - CODE_VARIABLES == set(), "in docs/configuration.md's table, never read by config.py"


@pytest.mark.parametrize("name", sorted(CODE_VARIABLES))
def test_documented_default_is_the_code_default(name):
    value = readme_default(documented_table()[name])
    if value is None:  # *(unset)*: the code must tell unset from empty
        assert name in UNSET_MATTERS
        assert getattr(Settings.from_env({}), name.lower()) is None
        assert getattr(Settings.from_env({name: ""}), name.lower()) == ""
        return
    assert settings({name: value}) == settings({}), \
        f"docs/configuration.md says {name} defaults to {value!r}; the code differs"


def test_readme_settings_are_the_documented_ones():
    """README's short table of the settings most users change: real variables, with the configuration page's
    default cell each."""
    rows = variable_rows(README, "README")
    assert 3 <= len(rows) <= 8, "README's table is the few settings most users change; the rest: docs/configuration.md"
    table = documented_table()
    for name, cell in rows.items():
        assert name in table, f"README's settings table names {name}, which docs/configuration.md does not list"
        assert cell == table[name], f"README: {name} defaults to {cell}; docs/configuration.md: {table[name]}"


# ---------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_env_agrees_with_the_docs():
    env = dockerfile_env()
    for name, value in env.items():
        if name in CONTAINER_OVERRIDES:
            assert value == CONTAINER_OVERRIDES[name], f"Dockerfile ENV {name}={value}"
            assert f"{name}={value}" in page("docker.md"), f"docs/docker.md must state {name}={value}"
        elif name in CODE_VARIABLES:
            assert settings({name: value}) == settings({}), \
                f"Dockerfile ENV {name}={value} contradicts docs/configuration.md"
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
    assert CONTAINER_OVERRIDES.keys() <= env.keys()


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    kinds = [i for i, _ in instructions]
    base = dict(instructions)["FROM"]
    # The base is a build argument (the Docker test passes a stand-in built from Debian packages) whose default
    # is the pinned official image.
    assert base == "${BASE_IMAGE}" and kinds[0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    base = dockerfile_args()["BASE_IMAGE"]
    assert base.startswith("python:3.11.")
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), f"FROM {base}: pin a tag and a digest"
    assert kinds.count("FROM") == 1
    runs = " ".join(rest for i, rest in instructions if i == "RUN")
    assert "pip install --no-cache-dir -c constraints.txt -r requirements.txt" in runs
    assert ("SAM2_BUILD_CUDA=0 pip install --no-cache-dir -c constraints.txt --no-deps --no-build-isolation "
            "-r requirements-nodeps.txt") in " ".join(runs.replace("\\\n", " ").split())  # as make install
    assert "python weights.py --dir /models" in runs and "${WEIGHTS}" in runs
    # weights.py without names fetches what the settings need: WEIGHTS="" must skip it, not fetch the defaults.
    assert 'if [ -n "${WEIGHTS}" ]; then python weights.py --dir /models ${WEIGHTS}; fi' in runs
    user = [rest for i, rest in instructions if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")  # the service never runs as root
    health = dict(instructions)["HEALTHCHECK"]
    assert "/health" in health and "PORT" in health
    cmd = dict(instructions)["CMD"]
    assert cmd.startswith('["gunicorn", "_wsgi:app"') and "preload" not in cmd
    assert "GUNICORN_CMD_ARGS" not in dockerfile_env()
    assert "9090" in dict(instructions)["EXPOSE"]


def pins(path: Path) -> dict[str, str]:
    """name -> version of each `name==version` line of a requirements or constraints file (names normalised)."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            found[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return found


def test_constraints_pin_every_requirement_at_its_version():
    # make install and the Dockerfile install with -c constraints.txt: a requirement at another version than its
    # constraint fails to install, so after editing a requirements file run `make constraints`.
    constraints = pins(ROOT / "constraints.txt")
    for name in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt", "requirements-ray.txt"):
        for package, version in pins(ROOT / name).items():
            assert constraints.get(package) == version, f"{name}: {package}=={version}, constraints.txt: " \
                                                          f"{constraints.get(package)}; run make constraints"


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert "*" in ignore
    for _, rest in (x for x in dockerfile_instructions() if x[0] == "COPY"):
        for source in rest.split()[:-1]:
            assert f"!{source}" in ignore or (source.endswith(".py") and "!*.py" in ignore), source


def test_default_weights_cover_the_default_settings_in_the_image():
    names = dockerfile_args()["WEIGHTS"].split()
    assert names == ["groundingdino_swint_ogc.pth", "mobile_sam.pt", "sam_vit_h_4b8939.pth", "bert-base-uncased"]
    manifest = weights.load_manifest()
    assert set(names) <= manifest.keys()
    image = Settings.from_env(dockerfile_env())
    baked = {f"/models/{spec['path']}" for name in names for spec in manifest[name]["files"]}
    assert image.groundingdino_checkpoint in baked and image.mobilesam_checkpoint in baked
    assert Settings.from_env({**dockerfile_env(), "USE_SAM": "true"}).sam_checkpoint in baked
    assert f"{image.groundingdino_text_encoder}/config.json" in baked


# ---------------------------------------------------------------------------------------------- compose

def test_compose_passes_every_container_variable_with_its_own_name():
    env = compose_environment()
    assert env.keys() <= CODE_VARIABLES, f"unknown variables in the compose file: {env.keys() - CODE_VARIABLES}"
    assert CODE_VARIABLES - NOT_IN_COMPOSE - env.keys() == set(), "documented but not in the compose file"
    for name in UNSET_MATTERS:
        assert env[name] is None, f"{name}: pass it through bare (an empty default would change its meaning)"


@pytest.mark.parametrize("name", sorted(CODE_VARIABLES - NOT_IN_COMPOSE - UNSET_MATTERS))
def test_compose_default_is_the_container_default(name):
    value = compose_default(name, compose_environment()[name])
    image = dockerfile_env()
    assert settings({**image, name: value}) == settings(image), \
        f"compose says {name} defaults to {value!r}; the image's default differs"


def test_compose_structure():
    service = COMPOSE["services"][SERVICE]
    assert service["ports"] == ["9090:9090"]
    # `-`, not `:-`: WEIGHTS= (empty, e.g. in .env) builds an image without model files, as the Dockerfile does.
    assert service["build"]["args"]["WEIGHTS"] == "${WEIGHTS-" + dockerfile_args()["WEIGHTS"] + "}"
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    mounts = {volume.split(":")[1] for volume in service["volumes"]}
    assert {"/data", "/models/local"} <= mounts
    assert "profiles" not in service  # `docker compose up` starts the backend

    label_studio = COMPOSE["services"]["label-studio"]
    assert label_studio["profiles"] == ["with-label-studio"]
    assert "ML_BLOCK_LOCAL_IP=false" in label_studio["environment"]
    assert label_studio["image"] == "heartexlabs/label-studio:1.23.2"
    harness = ROOT / "tests" / "label_studio_harness.py"
    if harness.exists():  # the version the end-to-end tests run against
        match = re.search(r'^LS_VERSION = "([^"]+)"', harness.read_text(encoding="utf-8"), re.M)
        if match:
            assert label_studio["image"].endswith(":" + match.group(1))


def test_cpu_override_only_drops_the_gpu():
    override = yaml.safe_load((ROOT / "docker-compose.cpu.yml").read_text(encoding="utf-8").replace("!reset", ""))
    service = override["services"][SERVICE]
    assert set(service) == {"deploy", "environment"} and not service["deploy"]
    assert service["environment"] == ["DEVICE=${DEVICE:-cpu}"]
    assert "!reset" in (ROOT / "docker-compose.cpu.yml").read_text(encoding="utf-8")


def test_docs_compose_examples_are_valid(tmp_path):
    """The YAML examples of docs/docker.md, merged over docker-compose.yml by Compose itself."""
    blocks = re.findall(r"```yaml\n(# (docker-compose\.[\w.]+\.yml).*?)```", page("docker.md"), re.S)
    assert len(blocks) >= 2
    for name in ("docker-compose.yml", "docker-compose.cpu.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    for text, name in blocks:
        override = yaml.safe_load(text.replace("!override", "").replace("!reset", ""))
        assert set(override["services"]) & set(COMPOSE["services"]), name
        compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
        if compose is None:
            continue  # structure only; `make install` provides the binary (requirements-dev.txt)
        (tmp_path / name).write_text(text, encoding="utf-8")
        result = subprocess.run([compose, "-f", "docker-compose.yml", "-f", name, "config", "--quiet"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"docs/docker.md's {name}: {result.stderr}"


# ---------------------------------------------------------------------------------------------- first run, tests, CI

def documented_test_files() -> set[str]:
    """tests/*.py names in the first column of docs/testing.md's table (`tests/test_a.py`, `test_b.py` | what)."""
    names = set()
    for line in page("testing.md").splitlines():
        cells = line.split("|")
        if len(cells) > 2:
            names.update(re.findall(r"`(?:tests/)?([\w]+\.py)`", cells[1]))
    return names


def test_test_table_lists_every_test_file():
    files = {path.name for path in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(files - documented_test_files())
    assert missing == [], f"add a row to docs/testing.md's table for {missing}"
    gone = sorted(name for name in documented_test_files() if not (ROOT / "tests" / name).exists())
    assert gone == [], f"docs/testing.md's table names files that don't exist: {gone}"


def make_dry_run(target: str, *args: str, **env: str | None) -> str:
    """What `make target args` would run (`env`: variables to set, or with None to unset, for it)."""
    import os

    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    # -W: as if the requirements had changed (the stamp is older); -n: print, run nothing.
    result = subprocess.run([make, "-n", "-W", "requirements.txt", target, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=environ)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("ci", "terminal", "bar"), [("true", "/dev/pts/0", "off"), (None, None, "off"),
                                                     (None, "/dev/pts/0", "on")])
def test_make_install_shows_progress_and_keeps_ci_logs_plain(ci, terminal, bar):
    # make sets MAKE_TERMOUT when its output is a terminal (here it is a pipe; the argument stands in for one).
    commands = make_dry_run("install", *([f"MAKE_TERMOUT={terminal}"] if terminal else []), CI=ci)
    pip_lines = [line for line in commands.splitlines() if "/pip install" in line]
    assert len(pip_lines) == 2, commands
    for line in pip_lines:
        assert f"--progress-bar {bar}" in line, line
        assert not re.search(r"\s(--quiet|-q+)(\s|$)", line), f"make install hides pip's output: {line}"
    assert commands.count('echo "make: installing') == 2  # one line naming each step


def test_label_studio_is_installed_with_its_constraints(tmp_path):
    import label_studio_harness as harness

    constraints = pins(harness.LS_CONSTRAINTS)  # every line name==version
    assert constraints["label-studio"] == harness.LS_VERSION, "run make constraints-label-studio"
    assert len(constraints) > 100 and "setuptools" in constraints  # all of it, setuptools too (pip freeze --all)
    assert "pip" not in constraints
    venv, install = harness.ls_install_commands("python3.11")
    assert install[install.index("-c") + 1] == str(harness.LS_CONSTRAINTS)
    assert install[-2:] == [f"label-studio=={harness.LS_VERSION}", f"moto[server]=={harness.MOTO_VERSION}"]
    assert constraints["moto"] == harness.MOTO_VERSION, "run make constraints-label-studio"
    # The stamp holds the constraints' digest: another file means another stamp, so the venv is built again.
    other = tmp_path / harness.LS_CONSTRAINTS.name
    other.write_bytes(harness.LS_CONSTRAINTS.read_bytes() + b"extra==1.0\n")
    assert harness.ls_stamp_text(other) != harness.ls_stamp_text()
    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    (fake_venv / "bin" / "label-studio").touch()
    stamp = fake_venv / "stamp"
    stamp.write_text(harness.ls_stamp_text())
    assert harness.ls_installed(fake_venv, stamp)
    assert not harness.ls_installed(fake_venv, stamp, other)
    stamp.write_text(f"label-studio=={harness.LS_VERSION}\n")  # a stamp of the unconstrained days
    assert not harness.ls_installed(fake_venv, stamp)


def test_make_constraints_label_studio_writes_the_harness_file():
    import label_studio_harness as harness

    commands = make_dry_run("constraints-label-studio")
    assert f"label-studio=={harness.LS_VERSION}" in commands
    assert f"> {harness.LS_CONSTRAINTS.relative_to(ROOT)}.new" in commands
    assert "freeze --all --exclude pip" in commands


def test_ci_installs_chromium_without_recommends():
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    installs = [line for line in run.splitlines() if "apt-get install" in line]
    assert installs and all("--no-install-recommends" in line for line in installs), installs


# A row whose meaning starts with "...and" continues the row above it: that row must be the one it continues.
CONTINUES = {"EMBEDDING_CACHE_MB": "EMBEDDING_CACHE_SIZE", "TEXT_THRESHOLD": "BOX_THRESHOLD"}


def test_table_rows_that_continue_follow_their_row():
    rows = re.findall(r"^\|\s*`([A-Z0-9_]+)`\s*\|[^|]*\|\s*([^|]*)\|", page("configuration.md"), re.M)
    names = [name for name, _ in rows]
    for index, (name, meaning) in enumerate(rows):
        if meaning.startswith("..."):
            assert name in CONTINUES, f"{name}'s meaning continues another row's: add it to CONTINUES"
            assert index and names[index - 1] == CONTINUES[name], \
                f"docs/configuration.md's table: {name} ({meaning[:30]}...) must come right after {CONTINUES[name]}"


# ---------------------------------------------------------------------------------------------- documentation site

def mkdocs_config() -> dict:
    # mkdocs.yml may hold !!python/name tags (plugins' options); this file has none, and a plain load keeps it so.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def nav_pages(nav) -> list[str]:
    """The page files of mkdocs.yml's nav (entries are {title: page} or {title: [entries]})."""
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_docs_nav_lists_every_page_once():
    pages = nav_pages(mkdocs_config()["nav"])
    files = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    assert sorted(pages) == files, "mkdocs.yml's nav and the pages of docs/ differ"
    assert len(pages) == len(set(pages))


def test_docs_build_is_strict_and_offline():
    config = mkdocs_config()
    # Each of these a warning, so that --strict (make docs, make lint) fails on it.
    assert config["validation"]["nav"] == {"omitted_files": "warn", "not_found": "warn", "absolute_links": "warn"}
    assert config["validation"]["links"] == {"not_found": "warn", "anchors": "warn", "absolute_links": "warn",
                                             "unrecognized_links": "warn"}
    assert config["theme"]["name"] == "material" and config["theme"]["font"] is False  # no Google Fonts
    assert "offline" not in config.get("plugins", [])  # it adds a script from unpkg.com
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^docs: install\n\t.*mkdocs build --strict --site-dir site$", makefile, re.M)
    assert re.search(r"^docs-serve: install\n\t.*mkdocs serve", makefile, re.M)
    assert re.search(r"^lint: install docs$", makefile, re.M)  # .ci/run runs make lint
    assert "site/" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not re.match(r"[a-z]+:", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_readme_labeling_config_is_the_documented_one():
    block = r"(?s)```xml\n(<View>.*?)```"
    assert re.search(block, README).group(1) == re.search(block, page("connect.md")).group(1)


def test_docs_site_builds_strictly(tmp_path):
    """`make docs` in a second: a broken link or anchor, or a page missing from the nav, fails here too."""
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
