"""Only ferry.storage talks to the Kubernetes API client (pykube), and the pure deciders
import neither kopf nor pykube (STYLE: handlers -> services -> storage)."""

import pathlib
import re

PKG = pathlib.Path(__file__).resolve().parents[2] / "operator" / "ferry"
PURE = ["placement", "migration/machine.py", "transfer/policy.py", "hosts/status.py", "agent/plan.py", "api"]


def _imports(path: pathlib.Path) -> set[str]:
    return set(re.findall(r"^\s*(?:from|import)\s+([a-zA-Z_][\w.]*)", path.read_text(), re.M))


def test_only_storage_imports_pykube():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if "storage" not in p.parts and any(m.split(".")[0] == "pykube" for m in _imports(p))]
    assert not offenders, offenders


def test_pure_modules_import_no_client_and_no_kopf():
    for rel in PURE:
        target = PKG / rel
        for p in ([target] if target.is_file() else target.rglob("*.py")):
            bad = {m for m in _imports(p) if m.split(".")[0] in ("kopf", "pykube", "requests", "aiohttp")
                   or m.startswith("ferry.storage")}
            assert not bad, (str(p.relative_to(PKG)), bad)
