"""Every shell and Python example in README.md and docs/api.md runs as written.

The blocks run in document order (README.md first) against a real `graft serve`, in a fresh
folder laid out like the repository root (`examples/` and `.venv/` are the real ones), with
`.venv/bin` on the PATH and `GRAFT_URL` pointing at the server, as a reader's terminal would
be. Nothing else is prepared: the files the examples use come from the steps the README tells
the reader to run (`examples/make_digits.py`). Variables a shell block sets are seen by the
blocks after it, as in one terminal. `curl` is made to fail on HTTP errors (a `.curlrc` with
`--fail-with-body`), so an example answered 4xx or 5xx fails the test.

A block that must not run (it starts a server, needs Docker or the reader's own files) is
preceded in the markdown by `<!-- not-run: REASON -->`.

A ```text block shows what the run block before it prints. Its figures are checked against what
the run printed: every `value% (low–high, n=N)` of a table row must be there with the same `n`,
and the run's value inside the interval the document shows (figures vary a little from machine
to machine, as the example model is trained on the reader's); a decision shown with strong
evidence must be the run's decision.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "api.md"]
LANGUAGES = {
    "bash": "shell",
    "sh": "shell",
    "console": "console",
    "python": "python",
    "text": "output",
}
ROW = re.compile(r"^[│|]\s*(.*?)\s*[│|]\s*(.*?)\s*[│|]\s*$")
FIGURE = re.compile(r"(-?[\d.]+)% \(([\d.]+)–([\d.]+), n=(\d+)\)")
NOT_RUN = re.compile(r"^<!--\s*not-run:(.*?)-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
BLOCK_TIMEOUT_S = 900  # a safety net only: the slowest block waits on one training job
IGNORED_ENV = {"_", "SHLVL", "OLDPWD", "PWD"}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    kind: str  # shell | console | python
    code: str
    not_run: str | None  # the reason given, when marked not-run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The ```bash/sh/console/python blocks of a markdown file, in order."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in LANGUAGES:
            previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            marker = NOT_RUN.match(previous.strip())
            found.append(
                Block(
                    path,
                    i + 1,
                    LANGUAGES[fence.group(1)],
                    "\n".join(lines[i + 1 : end]) + "\n",
                    marker.group(1).strip() if marker else None,
                )
            )
        i = end + 1
    return found


def shell_code(block: Block) -> str:
    if block.kind == "console":  # only the commands: lines after a "$ " prompt
        return "".join(line[2:] + "\n" for line in block.code.splitlines() if line[:2] == "$ ")
    return block.code


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> tuple[dict[str, str], str]:
    """Run one block; return the environment the next block starts with, and what it printed."""
    script = cwd / ".block"
    if block.kind == "python":
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        state = cwd / ".env-after"
        script.write_text(shell_code(block))
        # allexport: what a block sets, later blocks see, as in one terminal
        runner = f'set -a -euo pipefail\nsource "{script}"\nenv -0 > "{state}"\n'
        command = ["bash", "-c", runner]
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    if result.returncode != 0:
        pytest.fail(
            f"the example at {block.where} failed (exit {result.returncode}):\n{block.code}\n"
            f"--- stdout (end)\n{result.stdout[-4000:]}\n--- stderr (end)\n{result.stderr[-4000:]}"
        )
    printed = result.stdout + result.stderr
    if block.kind == "python":
        return env, printed
    pairs = (item.split("=", 1) for item in state.read_text().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k not in IGNORED_ENV}, printed


def table_rows(text: str) -> dict[str, str]:
    """``measure -> value`` of the two-column tables in ``text`` (wrapped values joined)."""
    rows: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        match = ROW.match(line.strip())
        if not match:
            continue
        measure, value = match.groups()
        if measure:
            last = measure
            rows[last] = value
        elif last:
            rows[last] += " " + value
    return rows


def check_figures(shown: Block, printed: str) -> list[str]:
    """What the document shows that the run did not give (see the module's docstring)."""
    expected, actual = table_rows(shown.code), table_rows(printed)
    problems = []
    for measure, value in expected.items():
        figure = FIGURE.search(value)
        decided = actual.get(measure, "").split(" ")[:1]
        if "(strong evidence)" in value and decided != value.split(" ")[:1]:
            problems.append(f"decision: shown {value!r}, the run gave {actual.get(measure)!r}")
        if not figure:
            continue
        got = FIGURE.search(actual.get(measure, ""))
        if got is None:
            problems.append(f"{measure}: shown {value!r}, the run printed none")
            continue
        low, high, n = float(figure.group(2)), float(figure.group(3)), figure.group(4)
        if got.group(4) != n or not low <= float(got.group(1)) <= high:
            problems.append(f"{measure}: shown {value!r}, the run gave {got.group(0)!r}")
    return problems


def tools_the_examples_use() -> None:
    missing = [tool for tool in ("bash", "curl", "jq", "unzip") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("GRAFT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"the examples need {', '.join(missing)}")
        pytest.skip(f"the examples need {', '.join(missing)}, absent here")


def reader_folder(root: Path, url: str) -> tuple[Path, dict[str, str]]:
    """A folder like the repository root, and the environment of a reader's terminal there."""
    (root / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (root / ".curlrc").write_text("fail-with-body\nshow-error\nsilent\n")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")},
        "GRAFT_URL": url,
        "CURL_HOME": str(root),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "VIRTUAL_ENV": sys.prefix,
    }
    return root, env


def test_every_not_run_block_says_why() -> None:
    everything = [b for path in DOCS for b in blocks(path) if b.kind != "output"]
    skipped = [b for b in everything if b.not_run is not None]
    assert len(everything) - len(skipped) >= 10, "the docs have lost their runnable examples"
    for block in skipped:
        assert block.not_run, f"{block.where} is marked not-run without a reason"
    markers = sum(len(re.findall(r"^<!--\s*not-run:", p.read_text(), re.M)) for p in DOCS)
    assert markers == len(skipped), "a not-run marker is not right before a code block"
    print(f"\n{len(everything) - len(skipped)} examples run, {len(skipped)} marked not-run:")
    for block in skipped:
        print(f"  {block.where}: {block.not_run}")


@pytest.mark.timeout(1800)  # a safety net: ten training jobs and the example data, on a CPU
def test_readme_and_api_examples_run_against_a_live_server(server, tmp_path) -> None:
    tools_the_examples_use()
    client, _, _ = server
    cwd, env = reader_folder(tmp_path, str(client.base_url).rstrip("/"))
    ran, skipped, problems, printed = [], [], [], ""
    for path in DOCS:
        for block in blocks(path):
            if block.kind == "output":
                wrong = [f"{block.where}: {p}" for p in check_figures(block, printed)]
                # what the run printed, to compare with (or to take into) the document
                problems += wrong + ([f"the run printed:\n{printed}"] if wrong else [])
                continue
            if block.not_run is not None:
                skipped.append(block)
                continue
            env, printed = run_block(block, cwd, env)
            ran.append(block)
    assert not problems, "figures the docs show that a run did not give:\n" + "\n".join(problems)
    print(f"\nran {len(ran)} examples; skipped {len(skipped)}:")
    for block in skipped:
        print(f"  {block.where}: {block.not_run}")
    # What the walkthroughs promise is there at the end of them, under the one folder the
    # README names, and nothing of theirs lies anywhere else.
    made = ["digits-v2.onnx", "digits-py-v2.onnx", "digits-curl-v2.safetensors"]
    made += ["digits-hf-v2/config.json", "digits-keras-v2.keras", "digits-onnx-v2.onnx"]
    for name in made:
        assert (cwd / "var" / "example" / name).stat().st_size > 0, name
    reader = {"examples", ".venv", ".curlrc", ".block", ".env-after", "var"}
    assert {p.name for p in cwd.iterdir()} <= reader, sorted(p.name for p in cwd.iterdir())
    assert {p.name for p in (cwd / "var").iterdir()} == {"example"}
    models = {m["name"] for m in client.get("/v1/models").json()["items"]}
    assert {"digits", "digits-nines", "digits-py", "digits-curl", "digits-api"} <= models
    assert {"digits-hf", "digits-keras", "digits-onnx"} <= models
