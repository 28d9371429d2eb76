"""Offline checks of the cluster files in Scripts/cluster: the Kubernetes manifests, the
Slurm template and the Dockerfile.

No cluster is reachable here, so the manifests are checked the way an API server would
check them as far as that can be done offline:
- core objects (PersistentVolumeClaim) and every Job template inside the JobSet against
  Kubernetes' published OpenAPI schemas with kubernetes-validate (strict: unknown fields
  are errors), plus the Job rules a schema cannot express (podFailurePolicy needs
  restartPolicy Never, its exit-code lists are sorted, unique, non-zero, and name a
  container of the pod);
- the JobSet against the jobset.x-k8s.io/v1alpha2 API as the JobSet types and admission
  webhook define it (field names, enums, required fields, replicated-job references,
  generated Job / pod names within 63 characters) — written here from the API types,
  since the CRD itself is not vendored;
- every flag the manifests and the Slurm template pass to an executable is one that the
  built executable's --help lists (LORA_GA_BIN, as Scripts/test sets it).
Each checker also gets a broken copy to prove it can fail.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "Scripts" / "cluster"
MANIFEST = CLUSTER / "k8s-lora-ga.yaml"
TEMPLATE = CLUSTER / "slurm-lora-ga.sbatch"
DOCKERFILE = CLUSTER / "Dockerfile"

# podFailurePolicy is GA from 1.31; the newest schema kubernetes-validate ships is checked too.
K8S_VERSIONS = sorted({"1.31.0", kubernetes_validate.latest_version()})

EXIT_USAGE, EXIT_INPUT, EXIT_AUTH, EXIT_RESUMABLE = 2, 3, 4, 75


def manifests() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def jobset() -> dict:
    (found,) = [doc for doc in manifests() if doc["kind"] == "JobSet"]
    return found


def replicated_job(js: dict, name: str) -> dict:
    (found,) = [rjob for rjob in js["spec"]["replicatedJobs"] if rjob["name"] == name]
    return found


# --- Kubernetes core schemas -------------------------------------------------------------


def core_errors(doc: dict) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{version}: {error.message} at {'/'.join(map(str, error.path))}")
    return errors


def job_rule_errors(job_spec: dict) -> list[str]:
    """batch/v1 Job validation rules that are not in the OpenAPI schema."""
    errors = []
    pod = job_spec["template"]["spec"]
    containers = {c["name"] for c in pod.get("containers", [])}
    policy = job_spec.get("podFailurePolicy")
    if policy:
        if pod.get("restartPolicy") != "Never":
            errors.append("podFailurePolicy requires restartPolicy: Never")
        for rule in policy.get("rules", []):
            if rule.get("action") not in {"FailJob", "FailIndex", "Ignore", "Count"}:
                errors.append(f"unknown podFailurePolicy action {rule.get('action')!r}")
            codes = rule.get("onExitCodes")
            if ("onExitCodes" in rule) == ("onPodConditions" in rule):
                errors.append("a podFailurePolicy rule needs exactly one of onExitCodes, onPodConditions")
            if codes:
                values = codes["values"]
                if values != sorted(set(values)):
                    errors.append(f"exit codes {values} must be sorted and unique")
                if codes["operator"] == "In" and 0 in values:
                    errors.append("exit code 0 cannot be listed with operator In")
                if codes.get("containerName") and codes["containerName"] not in containers:
                    errors.append(f"podFailurePolicy names container {codes['containerName']!r}, not in the pod")
    if job_spec.get("completionMode") == "Indexed" and "completions" not in job_spec:
        errors.append("an Indexed Job needs completions")
    return errors


# --- The JobSet API (jobset.x-k8s.io/v1alpha2) -------------------------------------------

SPEC_FIELDS = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
               "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"}
REPLICATED_JOB_FIELDS = {"name", "groupName", "template", "replicas", "dependsOn"}
NETWORK_FIELDS = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
SUCCESS_FIELDS = {"operator", "targetReplicatedJobs"}
FAILURE_FIELDS = {"maxRestarts", "restartStrategy", "rules"}
RULE_FIELDS = {"name", "action", "onJobFailureReasons", "onJobFailureMessagePatterns", "targetReplicatedJobs"}
RULE_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                       "MaxFailedIndexesExceeded", "PodFailurePolicy"}
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def dns1035_errors(what: str, name: str) -> list[str]:
    errors = []
    if len(name) > 63:
        errors.append(f"{what} {name!r} is longer than 63 characters")
    if not DNS1035.match(name):
        errors.append(f"{what} {name!r} is not a DNS-1035 label")
    return errors


def unknown(what: str, obj: dict, allowed: set[str]) -> list[str]:
    return [f"{what}: unknown field {key!r}" for key in sorted(set(obj) - allowed)]


def jobset_errors(js: dict) -> list[str]:
    errors = []
    if js.get("apiVersion") != "jobset.x-k8s.io/v1alpha2" or js.get("kind") != "JobSet":
        errors.append("not a jobset.x-k8s.io/v1alpha2 JobSet")
    name = js.get("metadata", {}).get("name", "")
    errors += dns1035_errors("JobSet name", name)
    spec = js.get("spec", {})
    errors += unknown("spec", spec, SPEC_FIELDS)
    rjobs = spec.get("replicatedJobs") or []
    if not rjobs:
        errors.append("spec.replicatedJobs is empty")
    names = [rjob.get("name") for rjob in rjobs]
    if len(names) != len(set(names)):
        errors.append(f"replicated job names {names} are not unique")
    for rjob in rjobs:
        where = f"replicatedJobs[{rjob.get('name')}]"
        errors += unknown(where, rjob, REPLICATED_JOB_FIELDS)
        if "name" not in rjob or "template" not in rjob:
            errors.append(f"{where}: name and template are required")
            continue
        replicas = rjob.get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 0:
            errors.append(f"{where}: replicas must be a non-negative integer")
            continue
        job_spec = rjob["template"].get("spec", {})
        # Generated names: <jobset>-<rjob>-<job index>, pods <job name>-<pod index>-<5 chars>.
        job_name = f"{name}-{rjob['name']}-{max(replicas - 1, 0)}"
        errors += dns1035_errors("generated Job name", job_name)
        if job_spec.get("completionMode", "Indexed") == "Indexed" and "completions" in job_spec:
            errors += dns1035_errors("generated pod name", f"{job_name}-{job_spec['completions'] - 1}-abcde")
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": job_name, **rjob["template"].get("metadata", {})}, "spec": job_spec}
        errors += [f"{where}: {e}" for e in core_errors(job) + job_rule_errors(job_spec)]
    network = spec.get("network", {})
    errors += unknown("network", network, NETWORK_FIELDS)
    if "subdomain" in network:
        errors += dns1035_errors("network.subdomain", network["subdomain"])
    success = spec.get("successPolicy")
    if success is not None:
        errors += unknown("successPolicy", success, SUCCESS_FIELDS)
        if success.get("operator") not in {"All", "Any"}:
            errors.append(f"successPolicy.operator {success.get('operator')!r} is not All or Any")
        errors += [f"successPolicy targets unknown replicated job {t!r}"
                   for t in success.get("targetReplicatedJobs", []) if t not in names]
    failure = spec.get("failurePolicy")
    if failure is not None:
        errors += unknown("failurePolicy", failure, FAILURE_FIELDS)
        if failure.get("restartStrategy", "Recreate") not in {"Recreate", "BlockingRecreate"}:
            errors.append(f"failurePolicy.restartStrategy {failure['restartStrategy']!r}")
        if not isinstance(failure.get("maxRestarts", 0), int) or failure.get("maxRestarts", 0) < 0:
            errors.append("failurePolicy.maxRestarts must be a non-negative integer")
        for rule in failure.get("rules", []):
            errors += unknown("failurePolicy rule", rule, RULE_FIELDS)
            if "name" not in rule or not RULE_NAME.match(rule["name"]):
                errors.append(f"failurePolicy rule name {rule.get('name')!r} is missing or malformed")
            if rule.get("action") not in RULE_ACTIONS:
                errors.append(f"failurePolicy rule action {rule.get('action')!r}")
            reasons = rule.get("onJobFailureReasons", [])
            if len(reasons) != len(set(reasons)) or not set(reasons) <= JOB_FAILURE_REASONS:
                errors.append(f"failurePolicy rule reasons {reasons}")
            errors += [f"failurePolicy rule targets unknown replicated job {t!r}"
                       for t in rule.get("targetReplicatedJobs", []) if t not in names]
    coordinator = spec.get("coordinator")
    if coordinator is not None and coordinator.get("replicatedJob") not in names:
        errors.append(f"coordinator.replicatedJob {coordinator.get('replicatedJob')!r} is unknown")
    return errors


# --- Flags the executables accept --------------------------------------------------------


def bin_dir() -> Path:
    path = os.environ.get("LORA_GA_BIN")
    if not path:
        pytest.skip("LORA_GA_BIN is unset (Scripts/test sets it to the swift build bin dir)")
    return Path(path)


def accepted_flags(executable: str) -> set[str]:
    """The long options `executable --help` lists: its SETTINGS section (the daemons' declared
    settings) and its OPTIONS section."""
    result = subprocess.run([str(bin_dir() / executable), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    sections = [part for marker in ("SETTINGS", "OPTIONS:") if marker in text for part in [text.split(marker, 1)[1]]]
    flags = {flag for section in sections for flag in re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", section, flags=re.M)}
    assert "--help" in flags, text
    return flags


def container(js: dict, rjob: str) -> dict:
    (found,) = replicated_job(js, rjob)["template"]["spec"]["template"]["spec"]["containers"]
    return found


def flags_in(args: list[str]) -> list[str]:
    return [arg for arg in args if arg.startswith("--")]


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- Tests -------------------------------------------------------------------------------


def test_manifest_holds_the_claim_and_the_jobset():
    kinds = sorted(doc["kind"] for doc in manifests())
    assert kinds == ["JobSet", "PersistentVolumeClaim"]


def test_core_objects_match_the_kubernetes_schema():
    for doc in manifests():
        if doc["kind"] != "JobSet":
            assert core_errors(doc) == [], doc["kind"]


def test_jobset_matches_the_jobset_api():
    assert jobset_errors(jobset()) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda js: js["spec"].__setitem__("sucessPolicy", {"operator": "All"}), "unknown field 'sucessPolicy'"),
    (lambda js: js["spec"]["successPolicy"].__setitem__("operator", "Every"), "is not All or Any"),
    (lambda js: js["spec"]["successPolicy"].__setitem__("targetReplicatedJobs", ["coord"]), "unknown replicated job 'coord'"),
    (lambda js: js["spec"]["failurePolicy"]["rules"][0].__setitem__("action", "FailJob"), "rule action 'FailJob'"),
    (lambda js: js["spec"]["failurePolicy"]["rules"][0].__setitem__("onJobFailureReasons", ["OOMKilled"]), "rule reasons"),
    (lambda js: js["spec"]["failurePolicy"]["rules"][0].__setitem__("name", "fail on config"), "malformed"),
    (lambda js: js["metadata"].__setitem__("name", "lora-ga-" + "x" * 60), "longer than 63"),
    (lambda js: replicated_job(js, "workers")["template"]["spec"]["template"]["spec"].__setitem__("restartPolicy", "OnFailure"),
     "requires restartPolicy: Never"),
    (lambda js: replicated_job(js, "workers")["template"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].__setitem__("values", [4, 3, 2]),
     "sorted and unique"),
    (lambda js: replicated_job(js, "workers")["template"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].__setitem__("containerName", "main"),
     "names container 'main'"),
    (lambda js: container(js, "coordinator")["ports"][0].__setitem__("containerPort", "7070"), "is not of type 'integer'"),
    (lambda js: container(js, "coordinator").__setitem__("argz", []), "argz"),
])
def test_jobset_checks_catch_a_broken_copy(breakage, expected):
    js = copy.deepcopy(jobset())
    breakage(js)
    errors = jobset_errors(js)
    assert any(expected in error for error in errors), errors


def test_pod_failure_policies_follow_the_exit_codes():
    js = jobset()
    for rjob in ("coordinator", "workers"):
        rules = replicated_job(js, rjob)["template"]["spec"]["podFailurePolicy"]["rules"]
        by_code = {code: rule["action"] for rule in rules if "onExitCodes" in rule
                   for code in rule["onExitCodes"]["values"]}
        # Configuration, input and authentication errors: retrying cannot help.
        assert {by_code[c] for c in (EXIT_USAGE, EXIT_INPUT, EXIT_AUTH)} == {"FailJob"}, rjob
        # Evictions and preemptions are not the program's failures.
        assert any(rule["action"] == "Ignore" and rule.get("onPodConditions") == [{"type": "DisruptionTarget", "status": "True"}]
                   for rule in rules), rjob
    # A coordinator stopped by SIGTERM checkpointed: recreate it without using up retries.
    assert _code_action(js, "coordinator", EXIT_RESUMABLE) == "Ignore"
    # A worker whose coordinator stayed away: counted, so retries end (then the JobSet restarts).
    assert _code_action(js, "workers", EXIT_RESUMABLE) == "Count"


def _code_action(js: dict, rjob: str, code: int) -> str:
    for rule in replicated_job(js, rjob)["template"]["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule and code in rule["onExitCodes"]["values"]:
            return rule["action"]
    return "Count"


def test_jobset_policies_end_on_the_coordinator_and_fail_on_policy_failures():
    spec = jobset()["spec"]
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["coordinator"]}
    first = spec["failurePolicy"]["rules"][0]
    assert first["action"] == "FailJobSet" and first["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert spec["failurePolicy"]["maxRestarts"] >= 1


def test_workers_dial_the_coordinators_headless_service_name():
    js = jobset()
    subdomain = js["spec"]["network"].get("subdomain", js["metadata"]["name"])
    assert js["spec"]["network"].get("enableDNSHostnames", True)
    coord = container(js, "coordinator")
    port = coord["ports"][0]["containerPort"]
    assert arg_value(coord["args"], "--listen") == f"0.0.0.0:{port}"
    expected = f"{js['metadata']['name']}-coordinator-0-0.{subdomain}:{port}"
    assert arg_value(container(js, "workers")["args"], "--connect") == expected


def test_worker_count_matches_the_coordinators_workers():
    js = jobset()
    workers = replicated_job(js, "workers")
    spec = workers["template"]["spec"]
    count = workers.get("replicas", 1) * spec["completions"]
    assert spec["parallelism"] == spec["completions"]
    assert int(arg_value(container(js, "coordinator")["args"], "--workers")) == count
    assert replicated_job(js, "coordinator")["replicas"] == 1
    assert replicated_job(js, "coordinator")["template"]["spec"]["completions"] == 1


def test_secret_comes_from_a_kubernetes_secret_mounted_where_the_flags_point():
    js = jobset()
    for rjob in ("coordinator", "workers"):
        pod = replicated_job(js, rjob)["template"]["spec"]["template"]["spec"]
        (main,) = pod["containers"]
        secret_file = Path(arg_value(main["args"], "--secret-file"))
        (mount,) = [m for m in main["volumeMounts"] if Path(m["mountPath"]) == secret_file.parent]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "lora-ga-secret"
        assert [item["path"] for item in volume["secret"]["items"]] == [secret_file.name]


def test_manifest_flags_and_environment_are_ones_the_executables_accept():
    js = jobset()
    for rjob, executable in (("coordinator", "lora-ga-coord"), ("workers", "lora-ga-worker")):
        main = container(js, rjob)
        assert main["command"] == [executable]
        accepted = accepted_flags(executable)
        assert set(flags_in(main["args"])) <= accepted, set(flags_in(main["args"])) - accepted
        for env in main.get("env", []):
            if env["name"].startswith("LORA_GA_"):
                flag = "--" + env["name"][len("LORA_GA_"):].lower().replace("_", "-")
                assert flag in accepted, f"{env['name']}: {executable} has no {flag}"


def test_flag_check_catches_an_unknown_flag():
    assert "--listen-address" not in accepted_flags("lora-ga-coord")
    assert "--port-file" in accepted_flags("lora-ga-coord")


def template_flags(block_start: str, block_end: str) -> set[str]:
    text = TEMPLATE.read_text()
    start = text.index(block_start)
    block = text[start:text.index(block_end, start)]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", block))


def test_slurm_template_flags_are_ones_the_executables_accept():
    coord = template_flags("COORD_ARGS=(", "\n\n")
    coord |= template_flags('COORD_ARGS+=(', ";")
    worker = template_flags('"$0" --connect', "\n")
    worker |= template_flags('grads=(--grads', ")")
    assert {"--listen", "--port-file", "--workers", "--out", "--secret-file"} <= coord
    assert {"--connect", "--grads", "--id", "--secret-file"} <= worker
    assert coord <= accepted_flags("lora-ga-coord"), coord - accepted_flags("lora-ga-coord")
    assert worker <= accepted_flags("lora-ga-worker"), worker - accepted_flags("lora-ga-worker")


def test_slurm_template_keeps_the_executables_defaults_and_a_free_port():
    text = TEMPLATE.read_text()
    # No mode or rank of its own: the coordinator's defaults (power, 8) apply.
    assert "--mode" not in text.split("set -euo pipefail", 1)[1]
    assert "--rank" not in text.split("set -euo pipefail", 1)[1]
    assert "7070" not in text
    assert '"0.0.0.0:${COORD_PORT:-0}"' in text
    assert "SRUN_CPUS_PER_TASK" in text


def test_dockerfile_builds_with_swift_and_runs_slim_and_unprivileged():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    images = [args.get(image.strip("${}"), image) for image, _ in stages]
    assert len(stages) == 2 and images[0].startswith("swift:") and images[1] == "debian:bookworm-slim"
    build, runtime = text.split("\nFROM ${RUNTIME_IMAGE}", 1)
    assert "--static-swift-stdlib" in build
    for product in ("lora-ga", "lora-ga-coord", "lora-ga-worker"):
        assert f'"$bin/{product}"' in build
    for package in ("libopenblas0", "libzstd1"):
        assert re.search(rf"\b{package}\b", runtime)
    user = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and "!Sources/" in ignore and "!Package.swift" in ignore


def test_runtime_image_provides_the_libraries_the_executables_load():
    """Every shared library the built executables need, apart from the Swift runtime the
    image links statically, comes from a Debian package the runtime stage installs or
    that debian:bookworm-slim already has (this host is Debian 12 as well)."""
    if shutil.which("dpkg") is None or not Path("/etc/debian_version").exists():
        pytest.skip("needs a Debian host to map libraries to the runtime image's packages")
    slim_has = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}
    runtime = DOCKERFILE.read_text().split("\nFROM ${RUNTIME_IMAGE}", 1)[1]
    installed = set(re.findall(r"\b(lib[a-z0-9.+-]+)\b", runtime))
    for executable in ("lora-ga", "lora-ga-coord", "lora-ga-worker"):
        ldd = subprocess.run(["ldd", str(bin_dir() / executable)], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            match = re.match(r"\s*(\S+) => (/\S+)", line)
            if not match or "/swift" in match.group(2) or "/.build/" in match.group(2):
                continue
            owner = subprocess.run(["dpkg", "-S", os.path.realpath(match.group(2))],
                                   capture_output=True, text=True)
            if owner.returncode != 0:
                owner = subprocess.run(["dpkg", "-S", match.group(2)], capture_output=True, text=True)
            assert owner.returncode == 0, f"{executable}: {match.group(1)} belongs to no Debian package"
            package = owner.stdout.split(":")[0]
            # libopenblas0 pulls in the pthread variant (libopenblas0-pthread) and libgfortran5.
            provided = installed | slim_has | {"libopenblas0-pthread", "libgfortran5", "libquadmath0"}
            assert package in provided, f"{executable} loads {match.group(1)} from {package}, not in the runtime image"
