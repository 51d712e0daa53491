"""hack/kind-e2e.sh cannot run here (no Docker daemon, no kind). These tests run it with
stand-ins for docker, kind, kubectl and helm that record what they are asked to do, and a
pytest plugin that records the environment tests/e2e would get: the script's flow, its
arguments and its contract with tests/e2e, and that it always tears the cluster down."""

from __future__ import annotations

import json
import pathlib
import subprocess
import textwrap

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "kind-e2e.sh"

FAKES = {
    "docker": """
        echo "docker $*" >> "$FAKE_LOG"
        exit 0
    """,
    "kind": """
        echo "kind $*" >> "$FAKE_LOG"
        state="$FAKE_DIR/clusters"; touch "$state"
        case "$1 $2" in
          "get clusters") cat "$state" ;;
          "create cluster")
            shift 2; name=""; config=""; kubeconfig=""
            while [ $# -gt 0 ]; do
              case "$1" in --name) name=$2; shift;; --config) config=$2; shift;; --kubeconfig) kubeconfig=$2; shift;; esac
              shift
            done
            cp "$config" "$FAKE_DIR/kind-config.yaml"; echo "apiVersion: v1" > "$kubeconfig"; echo "$name" >> "$state"
            [ "${FAKE_FAIL_CREATE:-0}" = 1 ] && exit 1
            exit 0 ;;
          "delete cluster") grep -vx "$4" "$state" > "$state.new" || true; mv "$state.new" "$state" ;;
        esac
        exit 0
    """,
    "kubectl": """
        shift 2   # --kubeconfig FILE
        echo "kubectl $*" >> "$FAKE_LOG"
        case "$*" in
          "version -o json") echo '{"serverVersion": {"major": "1", "minor": "'"${FAKE_MINOR:-31}"'"}}' ;;
          *"get pods -l"*"-o name"*) i=0; while [ $i -lt "$FAKE_WORKERS" ]; do echo "pod/p$i"; i=$((i+1)); done ;;
          *"get nodes -l ferry.dev/host=true"*) i=1; while [ $i -le "$FAKE_WORKERS" ]; do echo "ferry-e2e-worker$i"; i=$((i+1)); done ;;
          "apply -f -") cat >> "$FAKE_DIR/applied.yaml"; echo "---" >> "$FAKE_DIR/applied.yaml" ;;
        esac
        exit 0
    """,
    "helm": """
        echo "helm $*" >> "$FAKE_LOG"
        exit 0
    """,
}

PLUGIN = """
import json, os, pytest
def pytest_configure(config):
    env = {k: v for k, v in os.environ.items() if k.startswith("FERRY_") or k == "KUBECONFIG"}
    with open(os.environ["FAKE_DIR"] + "/e2e-env.json", "w") as f:
        json.dump({"env": env, "args": config.invocation_params.args}, f)
    pytest.exit("recorded", returncode=int(os.environ.get("FAKE_PYTEST_RC", "0")))
"""


@pytest.fixture
def fake(tmp_path: pathlib.Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        path.chmod(0o755)
    (tmp_path / "e2eenvplugin.py").write_text(PLUGIN)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        full_env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
            "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_DIR": str(tmp_path), "FAKE_WORKERS": "3",
            "PYTHONPATH": str(tmp_path), "FERRY_KIND_ARTIFACTS": str(tmp_path / "artifacts"), **env,
        }
        return subprocess.run(["bash", str(SCRIPT), "-p", "e2eenvplugin", *args], env=full_env,
                              capture_output=True, text=True, timeout=60)

    def calls() -> list[str]:
        log = tmp_path / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    run.calls = calls  # type: ignore[attr-defined]
    run.dir = tmp_path  # type: ignore[attr-defined]
    return run


def test_whole_flow_with_its_contract_to_tests_e2e(fake) -> None:
    proc = fake("-x")
    assert proc.returncode == 0, proc.stderr
    calls = fake.calls()

    config = yaml.safe_load((fake.dir / "kind-config.yaml").read_text())
    workers = [n for n in config["nodes"] if n["role"] == "worker"]
    assert len(workers) == 3 and all(n["labels"] == {"ferry.dev/host": "true"} for n in workers)
    assert [n["role"] for n in config["nodes"]].count("control-plane") == 1

    def index(prefix: str) -> int:
        return next(i for i, c in enumerate(calls) if c.startswith(prefix))

    # Order: cluster, image, load, chart, hosts, tests, teardown.
    order = [index("kind create cluster"), index("docker build -f"), index("kind load docker-image ferry:e2e"),
             index("helm --kubeconfig"), index("kubectl apply -f -"), index("kind delete cluster --name ferry-e2e")]
    assert order == sorted(order), calls
    assert f"docker build -f {ROOT}/operator/Dockerfile -t ferry:e2e {ROOT}" in calls
    [install] = [c for c in calls if c.startswith("helm ")]
    for flag in ("install ferry", f"{ROOT}/charts/ferry", "--namespace ferry-system", "--create-namespace",
                 f"-f {ROOT}/tests/e2e/values.yaml", "--set image.repository=ferry", "--set image.tag=e2e", "--wait"):
        assert flag in install, flag
    # The values every e2e run installs (hack/nodes-e2e.sh uses the same file).
    values = yaml.safe_load((ROOT / "tests" / "e2e" / "values.yaml").read_text())
    assert values["image"]["pullPolicy"] == "Never"
    assert values["settings"]["sizeScale"] == 0.001 and values["settings"]["noticeSeconds"] == 5
    assert values["metadata"]["addressSetup"]["enabled"] is True
    # One Host per worker node, named like it, waited for until Ready.
    hosts = [d for d in yaml.safe_load_all((fake.dir / "applied.yaml").read_text()) if d]
    assert [h["metadata"]["name"] for h in hosts] == [f"ferry-e2e-worker{i}" for i in (1, 2, 3)]
    assert all(h["kind"] == "Host" and h["spec"]["datacenter"] == "nyc3" for h in hosts)
    for i in (1, 2, 3):
        assert f"kubectl wait host/ferry-e2e-worker{i} --for=jsonpath={{.status.phase}}=Ready --timeout 180s" in calls

    recorded = json.loads((fake.dir / "e2e-env.json").read_text())
    env = recorded["env"]
    assert recorded["args"][-3:] == ["-p", "e2eenvplugin", "-x"]   # the script's arguments reach pytest
    assert "tests/e2e" in recorded["args"]
    assert env["KUBECONFIG"] == env["FERRY_TEST_KUBECONFIG"]
    assert env["FERRY_E2E_EXTERNAL"] == "1"
    assert env["FERRY_E2E_HOSTS"] == "ferry-e2e-worker1,ferry-e2e-worker2,ferry-e2e-worker3"
    assert env["FERRY_E2E_NAMESPACE"] == "ferry-system" and env["FERRY_E2E_RELEASE"] == "ferry"
    assert env["FERRY_E2E_NOTICE_SECONDS"] == "5" and env["FERRY_E2E_SIZE_SCALE"] == "0.001"
    assert env["FERRY_E2E_KIND_CLUSTER"] == "ferry-e2e"
    assert env["FERRY_E2E_NODE_EXEC"] == "docker exec {node}"
    assert env["FERRY_E2E_METADATA_URL"] == "http://169.254.169.254:80"
    assert env["FERRY_E2E_VALUES"] == str(ROOT / "tests" / "e2e" / "values.yaml")
    # Logs were collected before the cluster went away.
    assert index("kubectl get hosts,droplets,livemigrations") < index("kind delete cluster")
    assert (fake.dir / "artifacts" / "events.txt").exists()
    assert (fake.dir / "clusters").read_text().strip() == ""


def test_failing_tests_fail_the_script_and_still_tear_down(fake) -> None:
    proc = fake(FAKE_PYTEST_RC="3")
    assert proc.returncode == 3
    assert "tests/e2e failed (exit 3)" in proc.stderr
    assert any(c.startswith("kind delete cluster --name ferry-e2e") for c in fake.calls())


def test_keep_leaves_the_cluster_and_says_how_to_reach_it(fake) -> None:
    proc = fake(FERRY_KIND_KEEP="1")
    assert proc.returncode == 0, proc.stderr
    assert not any(c.startswith("kind delete") for c in fake.calls())
    assert "keeping cluster ferry-e2e" in proc.stderr and "KUBECONFIG=" in proc.stderr


def test_a_failed_cluster_creation_is_cleaned_up(fake) -> None:
    proc = fake(FAKE_FAIL_CREATE="1")
    assert proc.returncode != 0
    calls = fake.calls()
    assert not any(c.startswith("helm") or c.startswith("docker build") for c in calls)
    assert any(c.startswith("kind delete cluster --name ferry-e2e") for c in calls)


def test_an_existing_cluster_is_never_touched(fake) -> None:
    (fake.dir / "clusters").write_text("ferry-e2e\n")
    proc = fake()
    assert proc.returncode != 0 and "exists already" in proc.stderr
    assert not any(c.startswith(("kind create", "kind delete")) for c in fake.calls())


def test_too_old_kubernetes_is_refused(fake) -> None:
    proc = fake(FAKE_MINOR="29")
    assert proc.returncode != 0 and "needs >= 1.30" in proc.stderr
    assert not any(c.startswith("helm") for c in fake.calls())


def test_shellcheck_is_clean() -> None:
    if subprocess.run(["which", "shellcheck"], capture_output=True).returncode != 0:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted((ROOT / "hack").glob("*.sh"))
    assert ROOT / "hack" / "nodes.sh" in scripts
    proc = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout

