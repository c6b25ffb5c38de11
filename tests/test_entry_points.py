"""Blocks from other installed packages: the `hybrids.blocks` entry-point group.

A tiny distribution holding README.md's block in one file is "installed" into a temp dir on sys.path (a module
plus a *.dist-info with entry_points.txt is all importlib.metadata needs), then fresh interpreters (the CLI, a
spawned worker) must see its block without importing it themselves.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

README = ROOT / "README.md"


def readme_block() -> str:
    """The block written in one file in README.md (its only ```py block)."""
    (code,) = re.findall(r"^```py\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    return code


def install(root: Path, module: str, source: str) -> None:
    """A distribution named `module` whose `hybrids.blocks` entry point imports `module`."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hybrids.blocks]\n{module} = {module}\n")


def run(code: str, site: Path) -> subprocess.CompletedProcess:
    """Run `code` as a script file (so that a spawned child can import its __main__) with `site` on the path."""
    script = site / "main_script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


@pytest.fixture
def site(tmp_path):
    install(tmp_path, "running_mean_block", readme_block())
    return tmp_path


def test_cli_and_layouts_see_a_plugin_block(site):
    result = run("""
        import sys
        from hybrids.cli import main
        sys.exit(main(["blocks"]) or main(["layout", "2M2:R", "--d-model", "32"]))
    """, site)
    assert result.returncode == 0, result.stderr
    assert "R   running_mean" in result.stdout and "running_mean_block.RunningMean" in result.stdout
    assert "layout: 2M2:R" in result.stdout


def test_a_spawned_worker_builds_a_model_with_a_plugin_block(site):
    """Sweep workers are spawned: a fresh interpreter that imports only the registry's users."""
    result = run("""
        import multiprocessing as mp

        def build(layout):
            import torch
            from hybrids.model import build
            options = {"blocks.running_mean.bias": True, "blocks.mamba2.headdim": 8}
            model = build(layout, d_model=16, vocab_size=20, **options)
            return type(model.layers[1].mixer).__name__, tuple(model(torch.zeros(1, 5, dtype=torch.long)).shape)

        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(1) as pool:
                print(pool.apply(build, ("M2:R",)))
    """, site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('RunningMean', (1, 5, 20))"


def test_a_broken_plugin_is_one_line_naming_it(tmp_path):
    install(tmp_path, "broken_block", "raise ImportError('needs a package that is not installed')\n")
    result = run("""
        import sys
        from hybrids.cli import main
        sys.exit(main(["layout", "2M"]))
    """, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "hybrids: error: block plugin 'broken_block' (broken_block, entry point group hybrids.blocks) failed to "
        "load: ImportError: needs a package that is not installed")


def test_a_plugin_cannot_take_a_built_in_symbol(tmp_path):
    install(tmp_path, "clash_block", readme_block().replace('"R", RunningMeanConfig', '"M", RunningMeanConfig'))
    result = run("import blocks; blocks.get('M')", tmp_path)
    assert result.returncode == 1
    assert "block symbol 'M' is already registered (by Mamba)" in result.stderr.splitlines()[-1]
