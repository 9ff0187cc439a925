"""``python -m analysis VERB --help``: exit 0 for every verb, every flag listed with its description.

fire builds a verb's help from its function's signature and the docstring's Google-style ``Args:``
section, so two things are checked: the docstring describes every parameter in a form fire parses
without losing text, and the help fire actually prints shows that description under each flag.
Only help is asked for: no verb does any work here.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fire import docstrings

from analysis.cli import VERBS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _function(verb: str):
    module, name, _ = VERBS[verb]
    return getattr(importlib.import_module(module), name)


def _parameters(verb: str) -> list[inspect.Parameter]:
    """The verb's flags and positional arguments (its **overrides are described in the prose)."""
    return [p for p in inspect.signature(_function(verb)).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _args_section(doc: str) -> dict[str, str]:
    """``{name: description}`` of the docstring's ``Args:`` section, read by indentation.

    Each entry is ``name: text`` at one indentation, continuation lines deeper; the section must be
    the docstring's last (fire would append any later text to the last argument's description).
    """
    lines = doc.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    assert len(starts) == 1, "expected exactly one 'Args:' line"
    args: dict[str, list[str]] = {}
    indent = None
    name = None
    for line in lines[starts[0] + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        assert depth >= indent, f"text after the Args section (fire would add it to the last flag): {line!r}"
        if depth == indent:
            match = re.fullmatch(r"(\w+): (\S.*)", line.strip())
            assert match, f"an Args entry must read 'name: description': {line!r}"
            name = match.group(1)
            assert name not in args, f"{name} described twice"
            args[name] = [match.group(2)]
        else:
            args[name].append(line.strip())
    return {k: _norm(" ".join(v)) for k, v in args.items()}


def _help(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAGER": "cat", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "analysis", *argv], cwd=REPO_ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def _help_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """fire's help text -> ``{section: {argument: [description lines]}}`` for POSITIONAL ARGUMENTS and FLAGS.

    An entry is a line indented 4 (``COHORT``, ``-s, --seed=SEED`` or ``--seed=SEED``), its details
    are the lines indented 8 below it; ``Type:`` and ``Default:`` lines (or fire's ``Default...`` for a
    long value) are not description.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    section = entry = None
    for line in text.splitlines():
        if re.fullmatch(r"[A-Z][A-Z ]*", line):
            section, entry = line, None
            sections[section] = {}
        elif section in ("POSITIONAL ARGUMENTS", "FLAGS") and re.match(r" {4}\S", line):
            head = line.strip()
            if section == "FLAGS":
                match = re.fullmatch(r"(?:-\w, )?--(\w+)(?:=\S+)?", head)
                entry = match.group(1) if match else head
            else:
                entry = head.lower()
            sections[section][entry] = []
        elif entry is not None and re.match(r" {8}\S", line):
            detail = line.strip()
            if not re.match(r"(Type|Default)(: |\.\.\.)", detail):  # "Default..." = a value too long to show
                sections[section][entry].append(detail)
    return sections


VERB_NAMES = sorted(VERBS)


@pytest.mark.parametrize("verb", VERB_NAMES)
def test_docstring_args_name_every_parameter(verb):
    """A new flag without an Args line fails here, and so does an Args line fire would misread."""
    doc = inspect.getdoc(_function(verb))
    ours = _args_section(doc)
    params = [p.name for p in _parameters(verb)]
    assert sorted(ours) == sorted(params), f"Args section {sorted(ours)} != parameters {sorted(params)}"
    for name, text in ours.items():
        assert text, f"{name}: empty description"
    # fire's own parser must find exactly these arguments with all of their text; a continuation line
    # holding a colon, for one, would be cut there or read as a new argument
    theirs = {a.name: _norm(a.description or "") for a in docstrings.parse(doc).args or []}
    assert theirs == ours


@pytest.mark.parametrize("verb", VERB_NAMES)
def test_verb_help_exits_0_and_describes_every_flag(verb):
    run = _help(verb, "--help")
    text = run.stdout + run.stderr  # fire writes help to stderr when it is not a terminal
    assert run.returncode == 0, text
    assert f"'analysis {verb}'" in text
    entries = _help_entries(text)
    expected = _args_section(inspect.getdoc(_function(verb)))
    for p in _parameters(verb):
        section = "FLAGS" if p.default is not inspect.Parameter.empty else "POSITIONAL ARGUMENTS"
        listed = entries.get(section, {})
        assert p.name in listed, f"{p.name} not in {section} of the help:\n{text}"
        description = _norm(" ".join(listed[p.name]))
        assert description, f"{p.name}: no description line in the help:\n{text}"
        assert description == expected[p.name]


@pytest.mark.parametrize("argv", [["study", "-h"], ["nomogram", "-h"], ["export-bundle", "-h"],
                                  ["study", "--profile", "paper", "--help"]])
def test_short_flag_and_help_after_other_flags(argv):
    """-h is help too (not nomogram's --horizon, not a study setting), wherever it stands."""
    run = _help(*argv)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    assert "FLAGS" in text and f"'analysis {argv[0]}'" in text


def test_help_never_runs_the_verb(tmp_path):
    out = tmp_path / "study_out"
    run = _help("study", "--out", str(out), "--patients", "4", "--help")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not out.exists()
    run = _help("synth", str(out), "--patients", "2", "--", "--help")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not out.exists()


def test_top_level_help_lists_every_verb():
    for argv in ([], ["--help"], ["-h"], ["help"]):
        run = _help(*argv)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith("usage: python -m analysis VERB")
        for verb, (_, _, one_line) in VERBS.items():
            assert any(line.split()[:1] == [verb] and one_line in line for line in lines), verb


def test_unknown_verb_exits_2():
    run = _help("no-such-verb", "--help")
    assert run.returncode == 2
    assert "unknown verb 'no-such-verb'" in run.stderr and "verbs:" in run.stderr


def test_study_help_lists_every_profile_setting():
    """study's settings arrive through **overrides, so fire cannot list them: its docstring does,
    and a setting added to PROFILES without a line there fails here."""
    from analysis import study

    doc = inspect.getdoc(study.study_cli)
    settings = set().union(*(set(p) for p in study.PROFILES.values()))
    missing = sorted(k for k in settings if "--" + k.replace("_", "-") not in doc)
    assert not missing, missing
