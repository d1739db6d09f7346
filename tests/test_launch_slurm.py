"""``launch/slurm.sbatch`` run as Slurm would run it, with fake ``srun``, ``scontrol`` and
``hostname`` on PATH that record their arguments (no cluster): processes per node come from
Slurm's own variables, the rendezvous address is never a loopback one, each attempt logs to its
own folder, the environment hook is sourced, USR1 reaches the workers as SIGTERM, and a run that
checkpointed and stopped (status 75, or after USR1) is requeued."""

import os
import shlex
import signal
import subprocess
import time

import pytest
from helpers import REPO

SCRIPT = REPO / "launch" / "slurm.sbatch"

FAKE_SRUN = r"""#!/usr/bin/env bash
{ printf 'srun'; printf ' %q' "$@"; printf ' MARKER=%q\n' "${CONURE_TEST_MARKER:-}"; } >> "$FAKE_LOG"
for arg in "$@"; do
    if [[ $arg == hostname ]]; then echo "$FAKE_IPS"; exit 0; fi
done
if [[ -n ${FAKE_SRUN_SLEEP:-} ]]; then
    sleep "$FAKE_SRUN_SLEEP" &
    sleeper=$!
    trap 'kill $sleeper; echo "srun got TERM" >> "$FAKE_LOG"; exit "${FAKE_EXIT_ON_TERM:-75}"' TERM
    echo "srun waiting" >> "$FAKE_LOG"
    wait $sleeper
fi
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
{ printf 'scontrol'; printf ' %q' "$@"; echo; } >> "$FAKE_LOG"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-3\ngpu-node-4\n'; fi
"""
FAKE_HOSTNAME = r"""#!/usr/bin/env bash
{ printf 'hostname'; printf ' %q' "$@"; echo; } >> "$FAKE_LOG"
echo gpu-node-3
"""


@pytest.fixture
def slurm(tmp_path):
    """Run the script with fake Slurm commands; returns (process result, recorded calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("hostname", FAKE_HOSTNAME)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"

    def env(**extra: str) -> dict[str, str]:
        base = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "FAKE_LOG": str(log),
            "FAKE_IPS": "127.0.1.1 10.0.0.7 fe80::1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-node-[3-4]",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_SUBMIT_DIR": str(tmp_path),
        }
        return {**base, **extra}

    def run(**extra: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        log.write_text("")
        result = subprocess.run(
            ["bash", str(SCRIPT), "configs/ttl.yaml", "s3://b/runs/ttl", "data.root=s3://b/ttl"],
            env=env(**extra),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result, [shlex.split(line) for line in log.read_text().splitlines()]

    run.env = env
    run.log = log
    return run


def _step(calls: list[list[str]]) -> list[str]:
    """The srun that starts the workers (not the head-address query)."""
    (step,) = [c for c in calls if c[0] == "srun" and "hostname" not in c]
    return step


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_header_asks_slurm_for_signal_requeue_and_append():
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in header
    assert "#SBATCH --requeue" in header and "#SBATCH --open-mode=append" in header


@pytest.mark.parametrize(
    "granted, nproc",
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),
        ({"SLURM_GPUS_PER_NODE": "6"}, "6"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
        ({}, "1"),
        ({"GPUS_PER_NODE": "5", "SLURM_GPUS_ON_NODE": "4"}, "5"),
    ],
)
def test_processes_per_node_are_what_slurm_granted(slurm, granted, nproc):
    result, calls = slurm(**granted)
    assert result.returncode == 0, result.stderr
    step = _step(calls)
    assert _after(step, "--nproc_per_node") == nproc
    assert _after(step, "--nnodes") == "2" and _after(step, "--rdzv_id") == "4242"
    assert (
        step[-9:]
        == [
            *["-m", "conure_dist", "run", "--config", "configs/ttl.yaml", "--out", "s3://b/runs/ttl", "--resume"],
            "data.root=s3://b/ttl",
            "MARKER=",
        ][-9:]
    )


def test_the_rendezvous_address_is_never_loopback(slurm):
    result, calls = slurm()
    assert ["scontrol", "show", "hostnames", "gpu-node-[3-4]"] in calls
    query = next(c for c in calls if "hostname" in c)
    assert _after(query, "-w") == "gpu-node-3"
    assert _after(_step(calls), "--rdzv_endpoint") == "10.0.0.7:29500"
    result, calls = slurm(FAKE_IPS="127.0.1.1 ::1")
    assert result.returncode == 2
    assert "gpu-node-3 has no non-loopback address; set HEAD_ADDR" in result.stderr
    assert not [c for c in calls if c[0] == "srun" and "hostname" not in c]
    result, calls = slurm(FAKE_IPS="127.0.1.1", HEAD_ADDR="10.9.9.9", RDZV_PORT="29999")
    assert _after(_step(calls), "--rdzv_endpoint") == "10.9.9.9:29999"


def test_each_attempt_logs_to_its_own_folder_and_the_environment_hook_is_sourced(slurm, tmp_path):
    hook = tmp_path / "env.sh"
    hook.write_text("export CONURE_TEST_MARKER=activated\n")
    result, calls = slurm(SLURM_RESTART_COUNT="2", CONURE_ENV_SETUP=str(hook))
    assert result.returncode == 0, result.stderr
    step = _step(calls)
    log_dir = tmp_path / "conure-logs" / "4242" / "attempt-2"
    assert log_dir.is_dir()
    # bash -c 'exec torchrun --log-dir "$0/$SLURMD_NODENAME" ...' LOG_DIR: one folder per node
    assert step[step.index("-c") + 1].startswith('exec torchrun --log-dir "$0/$SLURMD_NODENAME"')
    assert step[step.index("-c") + 2] == str(log_dir)
    assert step[-1] == "MARKER=activated"


@pytest.mark.parametrize("status, requeued, exit_code", [(75, True, 0), (1, False, 1), (0, False, 0)])
def test_a_run_that_checkpointed_and_stopped_is_requeued(slurm, status, requeued, exit_code):
    result, calls = slurm(FAKE_SRUN_EXIT=str(status))
    assert result.returncode == exit_code, result.stderr
    assert (["scontrol", "requeue", "4242"] in calls) == requeued
    result, calls = slurm(FAKE_SRUN_EXIT="75", SLURM_RESTART_COUNT="20")
    assert result.returncode == 75 and ["scontrol", "requeue", "4242"] not in calls
    assert "stopped after 20 requeues" in result.stderr


def test_usr1_reaches_the_workers_and_the_job_is_requeued(slurm, tmp_path):
    """Slurm's USR1 to the batch shell: srun gets SIGTERM (which it and torchrun pass on to the
    workers); torchrun's own status is 1 then, and the job is requeued all the same."""
    slurm.log.write_text("")
    process = subprocess.Popen(
        ["bash", str(SCRIPT), "configs/ttl.yaml", "s3://b/runs/ttl"],
        env=slurm.env(FAKE_SRUN_SLEEP="30", FAKE_EXIT_ON_TERM="1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while "srun waiting" not in slurm.log.read_text():  # the fake srun has set its TERM trap
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGUSR1)
    _, err = process.communicate(timeout=30)
    calls = [shlex.split(line) for line in slurm.log.read_text().splitlines()]
    assert process.returncode == 0, err
    assert ["srun", "got", "TERM"] in calls
    assert calls[-1] == ["scontrol", "requeue", "4242"]
    assert "USR1 received" in err
