"""Nothing hangs and bad input never reaches a task: an unreachable --address, a resource
request no node can satisfy and an unusable store each exit 2 with the field; the embedded
Ray listens on the loopback interface only; rows name the harness's own commit.

The CLI runs as a subprocess with its own embedded Ray (never this session's)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from integration_support import tiny_scenario_dict

from harness import cli, scheduler

ROOT = Path(__file__).resolve().parents[2]


def _scenario(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_scenario_dict(**overrides)))
    return path


def _harness(*argv: str, timeout: float = 120, env: dict | None = None):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc, time.monotonic() - start


def test_unreachable_address_exits_2_naming_it(tmp_path):
    proc, seconds = _harness(
        "run", str(_scenario(tmp_path)), "--store", str(tmp_path / "st"),
        "--address", "127.0.0.1:1", timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--address" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert seconds < 30
    assert not (tmp_path / "st" / "runs").exists()  # nothing half-written


def test_not_a_ray_address_exits_2(tmp_path):
    proc, _ = _harness(
        "run", str(_scenario(tmp_path)), "--store", str(tmp_path / "st"), "--address", "ray://"
    )
    assert proc.returncode == 2 and "not a Ray address" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("resources", "field"),
    [({"train": {"num_cpus": 1, "num_gpus": 2}}, "resources.train"),
     ({"attack": {"num_cpus": 64, "num_gpus": 0}}, "resources.attack")],
)
def test_unsatisfiable_resources_exit_2_before_any_task(tmp_path, resources, field):
    """Before: "running 1" for ever. After: exit 2 naming the field and the nodes."""
    store = tmp_path / "st"
    proc, _ = _harness(
        "run", str(_scenario(tmp_path, resources=resources)), "--store", str(store),
        "--num-cpus", "2", timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert field in proc.stderr and "CPU 2 GPU 0" in proc.stderr, proc.stderr[-2000:]
    assert not (store / "runs").exists() and not (store / "results").exists()


def test_store_that_is_a_file_exits_2_before_ray(tmp_path, capsys):
    store = tmp_path / "a-file"
    store.write_text("not a folder")
    code = cli.main(["run", str(_scenario(tmp_path)), "--store", str(store)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--store" in err and "is a file" in err and str(store) in err


def test_store_under_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = cli.main(["run", str(_scenario(tmp_path)), "--store", str(tmp_path / "f" / "store")])
    assert code == 2
    assert "cannot write to the store" in capsys.readouterr().err


def test_unwritable_store_exits_2(tmp_path, capsys):
    """/sys refuses new folders even to root (a read-only or special mount)."""
    target = Path("/sys/wmbench-store")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    code = cli.main(["run", str(_scenario(tmp_path)), "--store", str(target)])
    assert code == 2
    assert "cannot write to the store" in capsys.readouterr().err


def test_embedded_ray_listens_on_loopback_only_and_its_token_is_private(tmp_path):
    """Every listening socket of the embedded Ray's processes is on 127.0.0.1, and the token
    file it creates (in a fresh HOME) is mode 0600."""
    script = textwrap.dedent(
        """
        import json, os, ray
        from integration_support import listening_addresses, session_processes
        from harness import scheduler
        scheduler.connect(None, 1)
        ray.get(ray.remote(lambda: 1).remote())  # a worker process too
        pids = set(session_processes(os.getsid(0)))
        print(json.dumps(sorted(listening_addresses(pids))), len(pids))
        ray.shutdown()
        """
    )
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(__file__).parent)},
        start_new_session=True,  # its Ray processes are the only ones of its session
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = yaml.safe_load(proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)[0])
    assert listening, "no listening socket found: the check saw nothing"
    assert set(listening) <= {"127.0.0.1", "::1"}, listening
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text()) == 64


def test_a_readable_token_file_is_made_private(tmp_path):
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("x" * 64)
    token.chmod(0o644)
    scheduler.private_token_file(token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "x" * 64


def test_git_sha_is_the_harness_checkout_not_the_working_directory(tmp_path, monkeypatch):
    other = tmp_path / "other-repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(
        ["git", "-C", str(other), "-c", "user.email=a@b", "-c", "user.name=a", "commit",
         "--allow-empty", "-qm", "x"], check=True,
    )
    monkeypatch.chdir(other)
    ours = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    theirs = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    sha = scheduler.git_sha.__wrapped__()
    assert sha.removesuffix("-dirty") == ours != theirs.stdout.strip()
