"""A Ray cluster that goes away mid-search (optimize/search.py, `run_on_ray`): the search stops within
seconds with a plain message, keeps the trials found (in the study and in search.json), records the trial in
flight as interrupted, and a rerun without Ray resumes from them.

The cluster is a real one, `ray start --head --block` in a process group of its own, so the test can kill it
from outside the driver (SIGKILL to that group and to every process it started) and check that none is
left. The search runs in a child process: when a cluster vanishes Ray ends its driver after a minute, and a
driver that hangs must not hang pytest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_search import fast, tiny

from modelpress.optimize.search import INTERRUPTED, SearchError, _cluster_alive, metric_evaluator, search

linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc for the cluster's processes"
)

# Ray's own clock: a driver whose cluster is gone is ended by Ray after this long; the search must stop first.
RAY_ENDS_DRIVER_S = 60


def _children() -> dict[int, list[int]]:
    """Each live process's children (zombies left out), from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(entry.name))
    return out


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class LocalCluster:
    """`ray start --head --block` with its own port and temp dir, killable from outside the driver."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        # Ray's unix socket paths live under it and must stay short: not under pytest's long tmp_path
        self.temp = tempfile.mkdtemp(prefix="mpray-")
        ray = Path(sys.executable).with_name("ray")
        args = [str(ray), "start", "--head", "--block", f"--port={self.port}", "--num-cpus=1"]
        args += [f"--temp-dir={self.temp}", "--include-dashboard=false", "--disable-usage-stats"]
        self.log = open(Path(self.temp) / "ray-start.log", "w")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=ray_env()
        )
        self.pids: set[int] = set()
        self.killed = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise AssertionError(f"the Ray head did not start: {(Path(self.temp) / 'ray-start.log').read_text()}")

    def kill(self) -> None:
        """SIGKILL the head's process group and every process it started (Ray workers get groups of their
        own), remembered for `left`. Once: a pid is not signalled again after it has been reaped."""
        if self.killed:
            return
        self.killed = True
        self.pids |= _descendants(self.proc.pid) | {self.proc.pid}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def left(self) -> list[int]:
        """The cluster's processes still alive a few seconds after `kill`."""
        deadline = time.monotonic() + 10
        while (alive := [p for p in self.pids if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive


def ray_env() -> dict[str, str]:
    # a test cluster on this machine alone: no token (Ray >= 2.5x turns token auth on for `ray start`)
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture()
def cluster() -> Iterator[LocalCluster]:
    pytest.importorskip("ray")
    head = LocalCluster()
    try:
        yield head
    finally:
        head.kill()
        left = head.left()
        shutil.rmtree(head.temp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_search import fast, tiny
    from modelpress.optimize.search import metric_evaluator, search

    out, address = Path(sys.argv[1]), sys.argv[2]
    model, data, labeled = tiny()
    accuracy = metric_evaluator(labeled)

    def evaluate(target):  # 1: the fp32 baseline (here), 2: trial 0, 3: trial 1 (in Ray workers)
        with open(out / "evaluations", "a") as f:
            f.write("x\\n")
        if len((out / "evaluations").read_text().splitlines()) == 3:
            (out / "in-flight").touch()
            time.sleep(600)  # the cluster is killed under this trial
        return accuracy(target)

    result = search(model, data, evaluate, config=fast(out, trials=3, ray_address=address))
    print(result.message)
    """
)


@pytest.mark.slow
@linux
def test_a_ray_cluster_that_goes_away_stops_the_search_and_keeps_what_was_found(cluster, tmp_path):
    import optuna

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "s"
    out.mkdir()
    driver = subprocess.Popen(
        [sys.executable, str(script), str(out), cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ray_env(),
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "in-flight").exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "in-flight").exists(), f"trial 1 never started on the cluster: {driver.poll()}"
        cluster.kill()
        killed = time.monotonic()
        try:
            stdout, stderr = driver.communicate(timeout=RAY_ENDS_DRIVER_S - 15)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the search did not stop after its Ray cluster went away (Ray ends such a driver at 60 s)"
            )
        stopped_in = time.monotonic() - killed
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert cluster.left() == []
    assert driver.returncode == 0 and "Traceback" not in stderr, stderr
    assert "Ray cluster" in stdout and "went away" in stdout, stdout
    print(f"the search stopped {stopped_in:.1f} s after the cluster was killed")

    # what was found is kept: in the result written to disk ...
    saved = json.loads((out / "search.json").read_text())
    assert "went away" in saved["stopped"] and saved["stopped"] in saved["message"]
    assert [(t["number"], t["state"]) for t in saved["trials"]] == [(0, "complete"), (1, "fail")]
    assert saved["trials"][1]["error"].startswith(INTERRUPTED)
    assert saved["front"] == [0] and saved["chosen"] == 0 and (out / "front.svg").exists()
    assert Path(saved["trials"][0]["artifact"]).exists() and (out / "recipe.yaml").exists()
    # ... and in the study
    storage = f"sqlite:///{out / 'study.db'}"
    before = optuna.load_study(study_name="modelpress-search", storage=storage).trials
    assert [t.state.name for t in before] == ["COMPLETE", "FAIL"]

    # a rerun without Ray resumes from them: trial 0 kept as it was, one more trial to reach 3
    model, data, labeled = tiny()
    result = search(model, data, metric_evaluator(labeled), config=fast(out, trials=3))
    assert [(t.number, t.state) for t in result.trials] == [(0, "complete"), (1, "fail"), (2, "complete")]
    assert result.trials[0].quality == saved["trials"][0]["quality"] and not result.stopped
    after = optuna.load_study(study_name="modelpress-search", storage=storage).trials
    assert after[0].values == before[0].values and after[0].params == before[0].params


class Hanging:
    """A stand-in for the `ray` module whose `nodes()` blocks, as Ray's does once the GCS is gone."""

    def nodes(self) -> list[dict]:
        time.sleep(120)
        return [{"Alive": True}]


def test_a_gone_cluster_is_told_at_once_without_asking_its_gcs():
    with socket.socket() as s:  # a port nobody listens on any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert not _cluster_alive(Hanging(), f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_a_cluster_that_wants_a_token_says_how_to_give_it(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")

    class AuthenticationError(Exception):  # ray.exceptions' (Ray >= 2.5x), by name
        pass

    def init(**kwargs: object) -> None:
        try:
            raise AuthenticationError("Authentication token is missing or incorrect")
        except AuthenticationError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from exc

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    model, data, labeled = tiny()
    config = fast(tmp_path / "s", trials=1, ray_address="auto")
    with pytest.raises(SearchError, match="RAY_AUTH_MODE=token"):
        search(model, data, metric_evaluator(labeled), config=config)
