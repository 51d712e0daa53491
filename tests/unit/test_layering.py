"""The layering contracts in pyproject.toml ([tool.importlinter]) hold: import-linter reads
every module of ferry and checks the layers, that only storage imports the API client, that
only the controller imports kopf, and that the deciders stay pure."""

import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(config: pathlib.Path) -> subprocess.CompletedProcess:
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"})


def test_every_contract_is_kept():
    out = _lint(ROOT / "pyproject.toml")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    # Every contract was checked (a renamed package is an error, not a silent pass).
    assert re.search(rf"Contracts: {len(_contracts())} kept, 0 broken", out.stdout), out.stdout[-2000:]


def test_a_broken_layer_is_reported(tmp_path):
    """The same checker fails on the first upward import: here, api importing storage."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    config = tmp_path / "inverted.toml"
    inverted = list(reversed(layers))  # api above everything: every real import now points upward
    config.write_text('[tool.importlinter]\nroot_package = "ferry"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "inverted"\ntype = "layers"\nlayers = [' + ", ".join(f'"{x}"' for x in inverted) + "]\n")
    out = _lint(config)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]
