"""The README's `dvc exp show` commands print a readable table; `dvc plots show` works offline.

Both run DVC on what git holds (metrics/*.json, dvc.lock, plots/*.csv), never a stage.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

# The widest the README's `dvc exp show` tables may be, in characters, on the committed metrics. 200
# is a maximized terminal on a 1920-pixel screen (~210 columns of a 9-pixel font). The committed
# metrics need ~80 (headline) and ~150 (every model); the rest leaves room for what the committed
# run lacks: a named experiment in `Experiment` (~20 more), gap closure once determined (~27),
# one or two changed params (~25 each).
MAX_WIDTH = 200
MODELS = ("teacher", "window_only", "lolcats", "no_transfer", "linear_only")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "COLUMNS": "1000"}  # wide enough to show its own width


def readme_commands(program: str) -> list[list[str]]:
    """The README's `dvc exp show ...` (or other) commands of its "Experiments and comparison" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Experiments and comparison", 1)[1].split("\n## ", 1)[0]
    lines = " ".join(re.findall(r"```bash\n(.*?)```", section, re.S)).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith(program)]


def dvc(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


EXP_SHOW = readme_commands("dvc exp show")


def test_readme_shows_experiments():
    assert len(EXP_SHOW) >= 2 and all("--keep" in c for c in EXP_SHOW)


@pytest.mark.parametrize("command", EXP_SHOW, ids=[f"exp-show-{i}" for i in range(len(EXP_SHOW))])
def test_readme_exp_show_is_readable(command):
    # HEAD's row alone: uncommitted params or metrics in the workspace leave the test as it is
    out = dvc(command[1:] + ["--no-pager", "--hide-workspace"])
    width = max(len(line) for line in out.splitlines())
    assert width <= MAX_WIDTH, f"{shlex.join(command)} prints {width} characters wide:\n{out}"
    assert "…" not in out, out
    header = out.splitlines()[1].split()
    assert header[0] == "Experiment" and len(header) > 2, out
    headline = json.loads((REPO / "metrics" / "report.json").read_text())
    keep = re.compile(command[command.index("--keep") + 1])
    expected = [name for name in headline if keep.match(name)]  # the --keep'd figures git holds
    assert expected and set(expected) <= set(header), out


def test_readme_exp_show_compares_every_model():
    shown = {name for command in EXP_SHOW
             for name in json.loads((REPO / "metrics" / "report.json").read_text())
             if re.compile(command[command.index("--keep") + 1]).match(name)}
    assert all(any(name.startswith(f"{model}_") for name in shown) for model in MODELS)


def test_plots_show_needs_no_network(tmp_path):
    [command] = readme_commands("dvc plots show")
    dvc(command[1:] + ["-o", str(tmp_path)])  # the template comes from .dvc/config
    page = (tmp_path / "index.html").read_text(encoding="utf8")
    sources = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?([^\"'\s>]+)", page, re.I)
    assert not [s for s in sources if re.match(r"(https?:)?//", s)], sources
    assert "cdn.jsdelivr.net" not in page
    # the three libraries are in the page, before the plots that call them
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"<script>/* {name} " in page
    assert page.count("vegaEmbed('#") >= 3 and page.index("/* vega-embed ") < page.index("vegaEmbed('#")
