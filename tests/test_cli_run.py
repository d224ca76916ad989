"""The `fedpriv` command as a user meets it: configuration mistakes, `~` in paths, stop signals, a clean log.

Configuration errors run the CLI's entry point in this process (it exits before anything starts);
the README's `~` example and the signal test run real processes, with their own timeouts, and
stop whatever they started by PID.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from fedpriv import rundir
from fedpriv.app_config import compose_config, expand_home
from fedpriv.cli import main as cli
from fedpriv.experiment import absolute_paths
from fedpriv.simulation import flower_line

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

PROJECT = Path(__file__).resolve().parents[1]
README = PROJECT / "README.md"
FEDPRIV = Path(sys.executable).parent / "fedpriv"
TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "model.width=4",
        "strategy.client_evaluate=false", "federation.num_hospitals=2", "federation.ledger_scope=run"]


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys):
    """Call `fedpriv ARGS` in this process from an empty folder: (exit code, stderr). Signal handlers are restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedpriv"])
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as done:
            code = done.code
        return code, capsys.readouterr().err

    yield call
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize(("args", "expected"), [
    (["privacy.epsilonn=1"], "Key 'epsilonn' not in 'PrivacyConfig'. Fix: check the spelling"),  # misspelt key
    (["privacy.epsilon=abc"], "could not be converted to Float"),  # wrong type
    (["strategy=paralel"], "Could not find 'strategy/paralel'. Fix: choose one of: parallel, sequential"),
    (["privacy.epsilon=[1"], "cannot read the override 'privacy.epsilon=[1'"),  # not Hydra's grammar
    (["privacy.epsilon=-1"], "privacy.epsilon=-1.0: must be a positive number"),  # fedpriv's own check
    (["federation.ledger_scope=run"], "MedMNIST file not found"),  # a data error, after the ledger folder check
    (["-m", "privacy.epsilonn=1,3"], "Key 'epsilonn' not in 'PrivacyConfig'"),  # a sweep: no multirun/ left
    (["-m", "dataset=synthetic", "privacy.epsilon=-1,3"], "must be a positive number"),  # its first job refused
])
def test_every_configuration_mistake_is_one_line_and_exit_2_and_leaves_no_run_directory(run_cli, tmp_path, monkeypatch,
                                                                                        args, expected):
    monkeypatch.setenv("FEDPRIV_DATA_DIR", str(tmp_path / "no-data"))  # not created: no PneumoniaMNIST here
    code, err = run_cli(*args)
    assert code == cli.EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpriv: error: ") and expected in lines[0], err
    assert "HYDRA_FULL_ERROR" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no stub run or sweep directory (nor an empty outputs/) is left
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_home(["federation.ledger_dir=~/ledgers", "~federation.ledger_dir", "-m", "resume=~",
                        "dataset.path=~/a b"]) == [f"federation.ledger_dir={tmp_path}/ledgers",
                                                   "~federation.ledger_dir", "-m", f"resume={tmp_path}",
                                                   f"dataset.path='{tmp_path}/a b'"]
    # Quoted on the command line, or from a config file: the value reaches fedpriv as "~/...".
    cfg = absolute_paths(compose_config([*TINY, 'federation.ledger_scope=persistent',
                                         'federation.ledger_dir="~/quoted"', "dataset.attributes_csv='~/a.csv'"]))
    assert cfg.federation.ledger_dir == str(tmp_path / "quoted")
    assert cfg.dataset.attributes_csv == str(tmp_path / "a.csv")
    cfg = absolute_paths(compose_config(["dataset.root=~/medmnist"]))
    assert cfg.dataset.root == str(tmp_path / "medmnist")


def _readme_block_lines(marker: str) -> list[str]:
    """The lines of the README's ```bash block that holds `marker`, without comments, as printed."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        if marker in block:
            joined = block.replace("\\\n", " ")
            return [line.split("  #")[0].strip() for line in joined.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    raise AssertionError(f"no ```bash block of the README holds {marker!r}")


@pytest.mark.slow
def test_the_readme_ledger_dir_example_works_as_printed(tmp_path):
    """`fedpriv federation.ledger_dir=~/fedpriv-ledgers` (the README's line): the folder is in the home folder.

    There is no data here, so the run stops with one line at the data check, after the ledger folder
    was checked (created) and before anything is spent.
    """
    line = next(line for line in _readme_block_lines("federation.ledger_dir=~") if "ledger_dir=~" in line)
    assert line == "fedpriv federation.ledger_dir=~/fedpriv-ledgers"
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{FEDPRIV.parent}:{os.environ['PATH']}",
           "FEDPRIV_DATA_DIR": str(tmp_path / "no-data")}
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == cli.EXIT_BAD_INPUT, done.stderr
    assert done.stderr.strip().splitlines() == [next(x for x in done.stderr.splitlines() if x.startswith("fedpriv:"))]
    assert "pneumoniamnist.npz" in done.stderr and "LexerNoViableAlt" not in done.stderr
    assert (tmp_path / "fedpriv-ledgers").is_dir() and not (tmp_path / "~").exists()
    assert not (tmp_path / "outputs").exists()


def test_flowers_misleading_lines_are_left_out_and_the_rest_is_kept():
    """Lines as Flower 1.42 and Ray print them (with Flower's colour codes)."""
    dropped = ["\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
               "\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:\n",
               "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>\n",
               "12/07/2026 05:31:28:DEBUG:Constructed ActorPool with: 2 actors\n",
               "\x1b[92mINFO \x1b[0m:      \n", "12/07/2026 05:32:22:INFO:\n",
               "\x1b[36m(ClientAppActor pid=12318)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor\n",
               "\x1b[36m(ClientAppActor pid=12318)\x1b[0m 12/07/2026 19:03:13:WARNING:Manually terminating ClientAppActor\n"]
    assert [flower_line(line) for line in dropped] == [None] * len(dropped)
    kept = ["INFO fedpriv: round 1/1: 2/2 hospitals trained\n",
            "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (3 simulated SuperNodes)\n"]
    assert [flower_line(line) for line in kept] == kept
    ray = ("(ClientAppActor pid=7) hello [repeated 2x across cluster] (Ray deduplicates logs by default. Set "
           "RAY_DEDUP_LOGS=0 to disable log deduplication, or see https://docs.ray.io/en/master/ray-observability/"
           "user-guides/configure-logging.html#log-deduplication for more options.)\n")
    assert flower_line(ray) == "(ClientAppActor pid=7) hello [repeated 2x across cluster]\n"
    explained = flower_line("Connection to the SuperLink is unavailable. Please check your network connection "
                            "and 'address' in the SuperLink connection configuration.\n")
    assert "not a network problem" in explained and "check your network" not in explained


# ------------------------------------------------------------------ real runs, started from a script


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _stop(pids) -> None:
    """SIGTERM each live process of `pids` with its descendants, SIGKILL what is left after 5 s (by PID)."""
    processes = []
    for pid in set(pids):
        try:
            root = psutil.Process(pid)
            processes += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    for process in psutil.wait_procs(processes, timeout=5)[1]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _in_background(args: list[str], folder: Path, *, stop_with: signal.Signals | None = None, after: str = "",
                   timeout: float = 400) -> tuple[int, str, set[int]]:
    """Start `fedpriv ARGS &` from a non-interactive bash script (so SIGINT starts ignored), as a user's
    script would; once `after` appears in its output, send `stop_with` (if any) to fedpriv (by PID).

    Returns fedpriv's exit code, its output and every process it started. Whatever is left of them at
    the end (also on a failed assertion or a timeout) is stopped by PID.
    """
    log = folder / f"fedpriv-{time.monotonic_ns()}.log"
    log.touch()  # the shell's redirect creates it only after `echo $!` has returned: never read a missing file
    script = f"{shlex.join([str(FEDPRIV), *args])} > {shlex.quote(str(log))} 2>&1 &\necho $!\nwait $!\necho \"exit $?\"\n"
    shell = subprocess.Popen(["bash", "-c", script], cwd=folder, stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    pid = int(shell.stdout.readline())
    seen: set[int] = {pid}
    try:
        deadline = time.monotonic() + timeout
        while shell.poll() is None and time.monotonic() < deadline:
            seen |= _descendants(pid)
            if stop_with is not None and after in log.read_text(errors="replace"):
                time.sleep(0.5)
                os.kill(pid, stop_with)
                stop_with = None
            time.sleep(0.2)
        rest = shell.communicate(timeout=60)[0]
        assert rest.startswith("exit "), f"fedpriv did not end within {timeout:.0f}s:\n{log.read_text()[-3000:]}"
        return int(rest.split()[1]), log.read_text(errors="replace"), seen
    finally:
        _stop(pid for pid in seen if _alive(pid))
        if shell.poll() is None:
            shell.kill()
            shell.wait(timeout=10)


def clean_log(output: str) -> None:
    """Nothing of Flower's or Ray's that misleads or only clutters reaches the user."""
    for noise in ("default simulated SuperNodes changed", "To change federation size", "simulation-config",
                  ":DEBUG:", "DEBUG :", "Ray deduplicates logs", "check your network", "Traceback"):
        assert noise not in output, f"{noise!r} in the output:\n{output[-3000:]}"


@pytest.mark.slow
def test_a_run_stopped_by_sigint_or_sigterm_says_how_to_resume_and_the_resume_finishes_on_its_ledgers(
        tmp_path, ledger_env_dir):
    """One run's life: stopped, resumed and stopped again, resumed to its end (three real `fedpriv` processes).

    A fixed sigma under a large budget leaves budget for the rounds after the interruption (with
    noise_multiplier=auto the planned rounds spend the whole budget, so a resumed run would rightly
    find every hospital locked).
    """
    # Round 1 is seen ~1.5 s before the signal lands, and a smoke round can take 0.4 s: the run must still be going.
    rounds = 12
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # SIGINT, to a background job of a script (which starts with SIGINT ignored), after round 1.
    code, output, seen = _in_background(["experiment=smoke", f"strategy.num_rounds={rounds}",
                                         "privacy.noise_multiplier=1.0", "privacy.epsilon=100",
                                         f"hydra.run.dir={first}"], tmp_path,
                                        stop_with=signal.SIGINT, after=f"round 1/{rounds}")
    assert code == cli.EXIT_INTERRUPTED, output[-3000:]
    resume = re.search(r"continue from its last checkpoint \(round-(\d+)\.pt\) with: (fedpriv resume=\S+)", output)
    assert "interrupted by SIGINT" in output and f"run directory: {first}" in output and resume, output[-3000:]
    assert resume.group(2) == f"fedpriv resume={first}"
    assert len(seen) > 3 and not [pid for pid in seen if _alive(pid)]  # the SuperLink, SuperExec, Ray: all gone
    clean_log(output)
    checkpointed = int(resume.group(1))
    assert 1 <= checkpointed < rounds and rundir.checkpoint(first, checkpointed).is_file()
    assert not rundir.checkpoint(first, checkpointed + 1).exists()  # the round in flight left none
    table = (first / "partition.md").read_text()  # the CLI saves the partition beside the run's outputs
    assert "SYNTHETIC" in table and all(f"hospital-{i}" in table for i in (1, 2, 3))
    assert [row["hospital"] for row in json.loads((first / "partition.json").read_text())] == [
        "hospital-1", "hospital-2", "hospital-3"]
    ledgers = sorted(path.name for path in (first / "ledgers").glob("*.db"))
    assert ledgers  # smoke keeps throw-away ledgers in its run directory

    # The printed command continues the run; SIGTERM stops it without Flower's "check your network".
    code, output, seen = _in_background([*shlex.split(resume.group(2))[1:], f"hydra.run.dir={second}"], tmp_path,
                                        stop_with=signal.SIGTERM, after="Starting Flower Simulation")
    assert code == cli.EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted by SIGTERM" in output and f"fedpriv resume={first}" in output, output[-3000:]
    assert "SuperLink is unavailable" not in output and not [pid for pid in seen if _alive(pid)]
    clean_log(output)

    # Resumed again, to its end: the rounds after the last checkpoint, on the first run's ledgers.
    code, output, seen = _in_background([f"resume={first}", f"hydra.run.dir={third}"], tmp_path)
    assert code == 0, output[-3000:]
    # A run to its end prints its summary once, where its outputs are, and nothing of Flower's or
    # Ray's that misleads or only clutters.
    assert output.count("# fedpriv run summary") == 1 and f"outputs in {third}" in output, output[-3000:]
    clean_log(output)
    metrics = json.loads((third / "metrics.json").read_text())
    assert [row["round"] for row in metrics["rounds"]] == list(range(checkpointed + 1, rounds + 1))
    result = json.loads((third / "result.json").read_text())
    assert (result["rounds_planned"], result["rounds_run"]) == (rounds, rounds - checkpointed)  # not conf/'s 40
    assert result["ledger_scope"] == "run" and result["ledger_folder"] == str(first / "ledgers")
    summary = (third / "summary.md").read_text()
    assert f"rounds run: {rounds - checkpointed} of {rounds}" in summary and "enforced within this run only" in summary
    # The resumed runs' hospitals charged the first run's ledgers, and kept none of their own.
    assert sorted(path.name for path in (first / "ledgers").glob("*.db")) == ledgers
    for resumed in (second, third):
        assert not (resumed / "ledgers").exists() and not list(resumed.rglob("*.db*"))
    assert not (ledger_env_dir.exists() and any(ledger_env_dir.iterdir()))  # nor in the persistent folder
    saved = OmegaConf.load(third / "config.yaml")
    assert (saved.strategy.num_rounds, saved.federation.ledger_run_dir) == (rounds, str(first))


def _listening(port: int) -> list[int]:
    """PIDs of the processes listening on 127.0.0.1:`port`."""
    return sorted({c.pid for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid})


def _with_home(home: Path) -> list[int]:
    """PIDs of the processes whose environment has HOME=`home` (what the shell of a test started)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("HOME") == str(home):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_readme_flwr_run_commands_work_as_printed(tmp_path):
    """The README's `flwr run .` block in one shell, from the project directory, with a bare PATH.

    Every line runs as printed but the default 40-round run (the smoke line is the same command with
    a run config). Only the SuperLink's port (Flower's FLWR_LOCAL_SUPERLINK_HTTP_API_PORT; 39091 in
    the kill line), the home folder and the run directory differ, so the test touches neither the
    user's ~/.flwr nor the project's outputs/. The federation has the config's 3 hospitals, nothing is
    installed, and the kill line leaves nothing running; anything left is stopped by PID.
    """
    lines = _readme_block_lines("flwr run . local")
    run_dir = tmp_path / "flwr-smoke"
    port, control = _free_port(), _free_port()
    script = ["set -e"] + [line.replace("39091", str(port)).replace('run-dir="outputs/flwr-smoke"', f'run-dir="{run_dir}"')
                           for line in lines if "--run-config" in line or not line.startswith("flwr run")]
    assert len(script) == 5 and script[1].startswith("source .venv/bin/activate") and "kill $(lsof" in script[-1]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "FEDPRIV_KEY_DIR": os.environ["FEDPRIV_KEY_DIR"], "FEDPRIV_LEDGER_DIR": os.environ["FEDPRIV_LEDGER_DIR"]}
    try:
        done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "(3 simulated SuperNodes)" in output and "hospital-3 (open" in output, output[-4000:]
        superlink_log = (tmp_path / ".flwr" / "local-superlink" / "superlink.log").read_text()
        assert "uv sync" not in output + superlink_log and "Installing application dependencies" not in superlink_log
        assert "mode: parallel, rounds run: 2 of 2" in (run_dir / "summary.md").read_text()
        time.sleep(2)
        assert _listening(port) == []  # the kill line stopped the SuperLink
    finally:  # the SuperLink, and anything it started (their environment names this test's home folder)
        _stop({*_listening(port), *_with_home(tmp_path)})


def test_the_readme_error_examples_print_what_the_readme_shows(run_cli, monkeypatch, tmp_path):
    """The README's `$ fedpriv ...` examples, each followed by the one line it prints."""
    blocks = re.findall(r"^```\w*\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
    block = next(b for b in blocks if "$ fedpriv" in b)
    lines = block.splitlines()
    examples = [(line[2:], lines[i + 1]) for i, line in enumerate(lines) if line.startswith("$ fedpriv ")]
    assert len(examples) >= 2
    monkeypatch.setenv("FEDPRIV_DATA_DIR", str(tmp_path / "no-data"))
    for command, printed in examples:
        code, err = run_cli(*shlex.split(command)[1:])
        assert (code, err.strip()) == (cli.EXIT_BAD_INPUT, printed), command


def _collected(*commands: str) -> list[int]:
    """How many tests each of the README's pytest `commands` selects, as printed but with --collect-only
    (the collections run side by side: each is a fresh process that imports the whole suite)."""
    started = []
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == [".venv/bin/python", "-m", "pytest"], command
        started.append(subprocess.Popen([sys.executable, "-m", "pytest", *words[3:], "--collect-only", "-p",
                                         "no:cacheprovider"], cwd=PROJECT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL))
    counts = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stdout[-2000:] + stderr[-2000:]
            found = re.search(r"^(\d+)(?:/\d+)? tests? collected", stdout, flags=re.M)
            assert found, stdout[-2000:]
            counts.append(int(found.group(1)))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return counts


@pytest.mark.slow  # collects the suite twice in fresh processes
def test_the_readme_test_commands_select_the_tests_it_says():
    """The full command (the one CI runs) selects every test, the quick one what the README counts."""
    full = next(line for line in _readme_block_lines("pytest -q") if "pytest" in line)
    quick = next(line for line in _readme_block_lines("not slow and not processes") if "pytest" in line)
    assert full == ".venv/bin/python -m pytest -q" and "-m" not in shlex.split(full)[3:]
    text = " ".join(README.read_text().split())
    total = int(re.search(r"It runs all (\d+) tests", text).group(1))
    subset, of = map(int, re.search(r"(\d+) of (\d+) tests, in [\d.]+ minutes", text).groups())
    assert _collected(full, quick) == [total, subset] and of == total
    assert 0 < subset < total
