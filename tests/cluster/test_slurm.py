"""Run the workflow through a real SLURM scheduler with the shipped profile
(config/profiles/slurm) on a tiny generated cohort.

Needs a SLURM cluster with a node up in partition `cacflow` and a (stand-in) GPU:
`sudo bash .ci/slurm-up` starts one on this machine. Without one the tests skip,
saying why; with CACFLOW_REQUIRE_SLURM=1 (as CI sets) they fail instead.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE = REPO_ROOT / "config" / "profiles" / "slurm"
PARTITION = "cacflow"  # the profile's default partition, as .ci/slurm-up names it
NODE_UP_STATES = {"idle", "mixed", "allocated", "completing"}
# Every rule that `snakemake` (the default target) runs as a SLURM job for a
# user manifest; `all` is a local rule.
SLURM_RULES = (
    "plan_shards", "discover", "select_series", "convert", "infer",
    "score", "aggregate", "data_dictionary", "report",
)
CPU_FALLBACK_ENGINE = "onnxruntime-cpu-int8"  # the shipped model's int8 copy
RUN_TIMEOUT_S = 900

pytestmark = [pytest.mark.slurm, pytest.mark.workflow, pytest.mark.slow]

# The rules call `cacflow`: put this interpreter's environment first on PATH, as an
# activated virtual environment would. sbatch passes it on to the jobs (--export=ALL).
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when they can."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "the Snakemake SLURM executor plugin is not installed (pip install -e '.[slurm]')"
    if shutil.which("sinfo") is None:
        return "`sinfo` is not on PATH: no SLURM client here (start a local cluster with `sudo bash .ci/slurm-up`)"
    try:
        result = subprocess.run(
            ["sinfo", "--noheader", f"--partition={PARTITION}", "--format=%T"],
            capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 30 s: is slurmctld running? (`sudo bash .ci/slurm-up`)"
    if result.returncode != 0:
        return f"`sinfo` failed ({result.returncode}): {result.stderr.strip()} (`sudo bash .ci/slurm-up`)"
    states = result.stdout.split()
    if not any(state in NODE_UP_STATES for state in states):
        return (f"no SLURM node is up in partition {PARTITION!r} (states: {states or 'none'}); "
                "start the local cluster with `sudo bash .ci/slurm-up`")
    return None


def require_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("CACFLOW_REQUIRE_SLURM") == "1":
        pytest.fail(f"CACFLOW_REQUIRE_SLURM=1 but {problem}", pytrace=False)
    print(f"skipping the SLURM tests: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    require_cluster()
    from cacflow.synth.cohort import generate_cohort

    workdir = tmp_path_factory.mktemp("slurm")  # one node: /tmp is the shared filesystem
    manifest = generate_cohort(workdir / "cohort", seed=3, size="tiny")
    command = [
        sys.executable, "-m", "snakemake",
        "-s", str(REPO_ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--profile", str(PROFILE),
        "--config", f"manifest={manifest}",
        # Test-only settings on top of the profile: keep the SLURM logs of successful
        # jobs (evidence that they ran under SLURM), poll sooner (the jobs take
        # seconds here, not hours), and log every sbatch call (--verbose).
        "--slurm-keep-successful-logs",
        "--slurm-init-seconds-before-status-checks", "2",
        "--verbose",
    ]
    output_path = workdir / "snakemake.out"
    started = time.monotonic()
    with open(output_path, "w") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=workdir, env=ENV,
                                timeout=RUN_TIMEOUT_S)
    elapsed = time.monotonic() - started
    text = output_path.read_text(errors="replace")
    print(f"snakemake on SLURM took {elapsed:.0f} s; output in {output_path}")
    if result.returncode != 0:
        raise AssertionError(f"snakemake on SLURM failed ({result.returncode}); output in {output_path}:\n"
                             f"{_without_debug(text)[-8000:]}")
    return workdir, Path(manifest), text


def _without_debug(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("DEBUG"))


def sbatch_calls(text: str) -> dict[str, list[str]]:
    """rule -> the sbatch command lines Snakemake ran for it (logged with --verbose)."""
    calls: dict[str, list[str]] = {}
    for match in re.finditer(r"sbatch call: (sbatch .*)", text):
        call = match.group(1)
        rule = re.search(r"slurm_logs/rule_([A-Za-z0-9_]+)/", call)
        assert rule, f"cannot tell the rule of this sbatch call: {call}"
        calls.setdefault(rule.group(1), []).append(call)
    return calls


def test_the_cohort_tables_have_one_scan_row_per_manifest_row(slurm_run):
    workdir, manifest, _ = slurm_run
    with open(manifest, newline="") as handle:
        expected = {(r["participant_id"], r["visit"]) for r in csv.DictReader(handle, delimiter="\t")}
    assert expected
    cohort = workdir / "results" / "cohort"
    rows = duckdb.sql(
        f"select participant_id, visit, status from read_parquet('{cohort / 'scans.parquet'}')"
    ).fetchall()
    assert len(rows) == len(expected)
    assert {(p, v) for p, v, _ in rows} == expected
    assert any(status == "scored" for _, _, status in rows)
    for table in ("lesions", "series"):
        duckdb.sql(f"select count(*) from read_parquet('{cohort / (table + '.parquet')}')").fetchall()
    for name in ("data_dictionary.csv", "data_dictionary.md", "report.html"):
        assert (cohort / name).stat().st_size > 0, name


def test_every_rule_ran_as_a_slurm_job(slurm_run):
    workdir, _, text = slurm_run
    calls = sbatch_calls(text)
    logs_dir = workdir / ".snakemake" / "slurm_logs"
    for rule in SLURM_RULES:
        assert calls.get(rule), f"no sbatch call for rule {rule}"
        assert all(f"-p {PARTITION}" in call for call in calls[rule]), calls[rule]
        logs = sorted((logs_dir / f"rule_{rule}").rglob("*.log"))
        assert logs, f"no SLURM log for rule {rule} under {logs_dir}"
        # Inside the allocation, Snakemake runs the rule with the SLURM job-step executor.
        assert any("--executor slurm-jobstep" in log.read_text(errors="replace") for log in logs), logs
        assert re.search(rf"Finished jobid: \d+ \(Rule: {rule}\)", text), f"rule {rule} did not finish"
    assert len(re.findall(r"has been submitted with SLURM jobid \d+", text)) >= len(SLURM_RULES)


def test_only_inference_asks_slurm_for_a_gpu(slurm_run):
    _, _, text = slurm_run
    calls = sbatch_calls(text)
    gpu_request = re.compile(r"--gpus[= ]1\b|--gres[= ]gpu:1\b")
    assert calls.get("infer"), "no sbatch call for rule infer"
    assert all(gpu_request.search(call) for call in calls["infer"]), calls["infer"]
    # The threads of config `resources:` become the CPU request.
    assert all("--cpus-per-task=2" in call and "--mem 4000" in call for call in calls["infer"]), calls["infer"]
    for rule, rule_calls in calls.items():
        if rule != "infer":
            assert not any("--gpus" in call or "--gres" in call for call in rule_calls), (rule, rule_calls)


def test_slurm_granted_the_gpu_request(slurm_run):
    """The scheduler accepted and ran the GPU job (the stand-in GPU of .ci/slurm-up)."""
    workdir, _, _ = slurm_run
    logs = sorted((workdir / ".snakemake" / "slurm_logs" / "rule_infer").rglob("*.log"))
    assert logs
    job_id = logs[0].stem
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if shown.returncode != 0:  # finished jobs leave slurmctld's memory after MinJobAge
        pytest.skip(f"scontrol no longer knows job {job_id}: {shown.stderr.strip()}")
    assert re.search(r"(TresPerJob|TresPerNode)=\S*gpu:1", shown.stdout), shown.stdout
    assert "JobState=COMPLETED" in shown.stdout, shown.stdout


def test_inference_fell_back_to_the_cpu_inside_the_gpu_job(slurm_run):
    workdir, _, _ = slurm_run
    infer_logs = sorted((workdir / "results" / "logs" / "infer").glob("*.log"))
    assert infer_logs
    for log in infer_logs:
        assert f"engine {CPU_FALLBACK_ENGINE}" in log.read_text(), log
    engines = duckdb.sql(
        "select distinct engine from read_parquet("
        f"'{workdir / 'results/cohort/scans.parquet'}') where engine is not null"
    ).fetchall()
    assert engines == [(CPU_FALLBACK_ENGINE,)]
