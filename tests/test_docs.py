"""The documentation runs: its Python code blocks execute, its commands parse, its config reference covers the schema.

Every fenced ``python`` block of a page under ``docs/`` runs, the page's blocks in order in one fresh interpreter
(as a reader pasting them would), with ``epochs=N`` cut to ``epochs=2``; a block preceded by a line
``<!-- not run: reason -->`` is skipped (it needs hardware or data a test has not). Every ``lipdp ...`` line of a
``bash`` block in the docs and the README is parsed by the CLI's own parser, and a ``lipdp train`` line's config
and ``--set`` overrides are validated as ``lipdp train`` would before loading any data.
"""

import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from lipdp import cli, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
FENCE = re.compile(r"(<!-- not run: [^>]*-->\n)?```(\w*)\n(.*?)```", re.S)
# Pages whose code trains several models or audits one (over ~20 s): `make test-docs` runs them, in CI too.
SLOW_PAGES = {"guides/reports-audits.md", "guides/tuning.md", "guides/distributed.md", "guides/frontends.md"}


def _relative(page):
    return os.path.relpath(page, DOCS).replace(os.sep, "/")


def code_blocks(text, language):
    """The fenced blocks of ``language`` in ``text``, without those marked ``<!-- not run: ... -->``."""
    return [body for skip, lang, body in FENCE.findall(text) if lang == language and not skip]


def _page_params():
    params = []
    for page in PAGES:
        if code_blocks(open(page).read(), "python"):
            marks = [pytest.mark.slow] if _relative(page) in SLOW_PAGES else []
            params.append(pytest.param(page, id=_relative(page), marks=marks))
    return params


@pytest.mark.parametrize("page", _page_params())
def test_page_code_runs(page, tmp_path):
    code = "\n".join(code_blocks(open(page).read(), "python"))
    script = tmp_path / "page.py"
    script.write_text(re.sub(r"\bepochs=\d+", "epochs=2", code))
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")  # pages use the shipped configs
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}  # as on a user's machine
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's lipdp
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_every_page_with_code_runs_somewhere():
    """A page's Python blocks either run here or are marked, so a new page cannot be skipped by accident."""
    ran = {p.id for p in _page_params()}
    for page in PAGES:
        text = open(page).read()
        blocks = re.findall(r"```python\n", text)
        assert len(blocks) == len(code_blocks(text, "python")) + text.count("<!-- not run: "), page
        assert not code_blocks(text, "python") or _relative(page) in ran


def _command_lines(text):
    """The ``lipdp ...`` commands of the ``bash`` blocks of ``text`` (continuations joined, comments cut)."""
    commands = []
    for body in code_blocks(text, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments: TF_CONFIG=...
                words = words[1:]
            if words and words[0] == "lipdp":
                commands.append(words[1:])
    return commands


DOCUMENTS = PAGES + [os.path.join(ROOT, "README.md")]


def test_documented_commands_parse():
    commands = [c for d in DOCUMENTS for c in _command_lines(open(d).read())]
    assert any(c[0] == "train" for c in commands) and any(c[0] == "report" for c in commands)
    for words in commands:
        try:
            args = cli.parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"lipdp {' '.join(words)}: the CLI refuses these arguments")
        if args.command == "train":
            config.load(os.path.join(ROOT, args.config), args.set or [])  # raises ConfigError naming the key


def test_documented_commands_check_their_config():
    """The check above fails on a stale key (as a page would after a rename)."""
    text = "```bash\nlipdp train configs/digits.yaml --set model.no_such_key=1\n```\n"
    (words,) = _command_lines(text)
    args = cli.parser().parse_args(words)
    with pytest.raises(config.ConfigError, match="no_such_key"):
        config.load(os.path.join(ROOT, args.config), args.set)


def _config_reference():
    spec = importlib.util.spec_from_file_location(
        "config_reference", os.path.join(DOCS, "_hooks", "config_reference.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_covers_every_schema_field():
    reference = _config_reference()
    fields = reference.schema_fields()
    keys = {f"{section}.{field.name}" for section, field in fields}
    assert set(reference.DESCRIPTIONS) == keys, "describe exactly the schema's keys"
    page = reference.generate()
    for section, field in fields:
        row = re.search(rf"^\| `{field.name}` \|.*\|$", page.split(f"## `{section}`")[1].split("## ")[0], re.M)
        assert row, f"{section}.{field.name} missing from the config reference"
        assert reference.DESCRIPTIONS[f"{section}.{field.name}"] in row.group(0)
    sections = [f.name for f in dataclasses.fields(config.Config)]
    assert re.findall(r"^## `(\w+)`", page, re.M) == sections
    assert reference.MARKER in open(os.path.join(DOCS, "reference", "config.md")).read()


def test_readme_links_resolve():
    text = open(os.path.join(ROOT, "README.md")).read()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links
    for link in links:
        if not re.match(r"\w+://", link):
            assert os.path.exists(os.path.join(ROOT, link)), f"README links to a missing file: {link}"


def test_api_reference_covers_every_module():
    """A module added to lipdp (or split out of another) gets its page in the API reference, or the build lacks it."""
    pages = "".join(open(p).read() for p in glob.glob(os.path.join(DOCS, "reference", "api", "*.md")))
    documented = set(re.findall(r"^::: (lipdp[\w.]*)$", pages, re.M))
    package = os.path.join(ROOT, "lipdp")
    modules = {
        "lipdp." + os.path.relpath(path, package)[: -len(".py")].replace(os.sep, ".")
        for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True)
        if os.path.basename(path) != "__init__.py"
    }
    assert modules - documented == set(), "add these modules to a page of docs/reference/api/"
    assert documented - modules <= {"lipdp"}, "these documented modules no longer exist"


def test_paths_named_in_the_docs_exist():
    """A file the docs name (a config, a script, a result, a test) exists: a rename or a split shows here."""
    named = set()
    for document in DOCUMENTS + [os.path.join(ROOT, "experiments", "results", "README.md")]:
        text = open(document).read()
        named.update(re.findall(r"(?<![\w/.:-])((?:configs|experiments|lipdp|tests|docs)/[\w./-]*[\w/])", text))
    assert any(p.startswith("tests/") for p in named) and any(p.startswith("experiments/results/") for p in named)
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert missing == [], "the docs name files that do not exist"
