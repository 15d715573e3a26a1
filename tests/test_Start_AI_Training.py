"""The Windows launcher: parsed by a PowerShell grammar, its parameters and the command it builds.

Where a real PowerShell (`pwsh`) is installed, the launcher's -DryRun output is checked too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "Start_AI_Training.ps1"
EXAMPLE_ENV = ROOT / "payton_env.example.ps1"
PARAMETERS = {
    "Config",
    "Resume",
    "Set",
    "ExtraArgs",
    "CudaTorch",
    "TorchIndexUrl",
    "VenvDir",
    "EnvFile",
    "Python",
    "NProcPerNode",
    "SkipInstall",
    "DryRun",
}


def parse(path: Path):  # -> tree_sitter.Tree
    ts = pytest.importorskip("tree_sitter")
    grammar = pytest.importorskip("tree_sitter_powershell")
    parser = ts.Parser(ts.Language(grammar.language()))
    return parser.parse(path.read_bytes())


def walk(node):  # -> Iterator[tree_sitter.Node]
    yield node
    for child in node.children:
        yield from walk(child)


def error_lines(tree) -> list[int]:
    return sorted({n.start_point[0] + 1 for n in walk(tree.root_node) if n.type == "ERROR" or n.is_missing})


@pytest.mark.parametrize("path", [SCRIPT, EXAMPLE_ENV], ids=lambda p: p.name)
def test_scripts_parse_without_errors(path: Path) -> None:
    tree = parse(path)
    assert not tree.root_node.has_error, f"{path.name}: syntax errors at lines {error_lines(tree)}"


def test_the_grammar_catches_a_broken_script(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ps1"
    broken.write_text(SCRIPT.read_text(encoding="utf-8").replace("foreach ($override in $Set) {", "foreach ($override in $Set {"), encoding="utf-8")
    assert parse(broken).root_node.has_error


def test_parameters() -> None:
    tree = parse(SCRIPT)
    blocks = [n for n in walk(tree.root_node) if n.type == "param_block"]
    assert len(blocks) == 1
    names = {
        SCRIPT.read_bytes()[v.start_byte : v.end_byte].decode()[1:]
        for v in walk(blocks[0])
        if v.type == "variable" and v.parent.type == "script_parameter"
    }
    assert names == PARAMETERS


def test_ascii_only_for_windows_powershell_5() -> None:
    # PowerShell 5.1 reads a file without a byte-order mark in the ANSI code page.
    for path in (SCRIPT, EXAMPLE_ENV):
        path.read_bytes().decode("ascii")


def test_command_it_builds_and_exit_code() -> None:
    text = SCRIPT.read_text(encoding="utf-8")
    assert '$trainArgs = @("train_direct.py", "--config", $Config)' in text
    assert 'foreach ($override in $Set) { $trainArgs += @("--set", $override) }' in text
    assert 'if ($Resume) { $trainArgs += @("--resume", $Resume) }' in text
    assert "$trainArgs += $ExtraArgs" in text  # --accept-data-change and the like pass through
    assert '"-m", "torch.distributed.run", "--standalone", "--nproc-per-node"' in text
    assert re.search(r"& \$venvPython @trainArgs\s+exit \$LASTEXITCODE\s*$", text)
    # thin: no training logic in the launcher
    assert len([line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]) < 110


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell (pwsh) is not installed here")
def test_dry_run_prints_the_command() -> None:
    proc = subprocess.run(
        [
            "pwsh",
            "-NoProfile",
            "-File",
            str(SCRIPT),
            "-DryRun",
            "-Config",
            "configs/x.yaml",
            "-Set",
            "a.b=1,c.d=2",
            "-Resume",
            "latest",
            "-EnvFile",
            "none.ps1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("train_direct.py --config configs/x.yaml --set a.b=1 --set c.d=2 --resume latest")
