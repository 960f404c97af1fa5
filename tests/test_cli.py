"""The front door: the example, `qsbr demo` and `qsbr bench` run and verify."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import qsbr
from qsbr.cli import main
from qsbr.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hot_swap_config.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "closed: 199" in out.stdout


def test_demo_verifies_and_reports() -> None:
    buf = io.StringIO()
    report = run_demo(seconds=1.0, readers=2, out=buf)
    assert report.ok, buf.getvalue()
    assert report.swaps > 0 and report.reads > 0
    assert report.releases == report.swaps + 1
    assert "verified" in buf.getvalue()


def test_demo_command_exit_status() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qsbr", "demo", "--seconds", "1", "--readers", "2", "--no-reclaimer"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified" in out.stdout


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--seconds", "0"])
    assert exc.value.code == 2
    assert "--seconds" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_bench_quick_writes_results(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qsbr", "bench", "--quick", "--out", str(tmp_path), "core"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "quiescent / empty method call" in out.stdout
    result_files = sorted(tmp_path.glob("core-*.json"))
    assert result_files
    data = json.loads(result_files[-1].read_text())
    # Every kernel here is timed in the one run: the one in use, and the pure
    # one beside a native one.
    kernels = ["native", "python"] if qsbr.implementation == "native" else ["python"]
    assert data["kernels"] == kernels
    for k in kernels:
        assert data["ratios"][k]["quiescent_vs_empty_call"] > 0
        assert data["targets"]["P1 quiescent / empty method call"][k] > 0
        assert data["handle_quiescent_two_threads_vs_one"][k]["ratio"] > 0
    assert data["floor"]["floor_retire_checked_vs_append_call"] > 0


def test_bench_floor_runs_every_release_once() -> None:
    """The floor is only a fair lower bound if it does the work it claims
    (benchmarks/bench_core.py, check_floor)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--check-floor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every release ran once" in out.stdout


@pytest.mark.timeout(300)
def test_a_quick_bench_run_leaves_the_checkouts_results_alone(tmp_path: Path) -> None:
    """qsbr bench --quick run from another folder used to overwrite the
    committed benchmarks/results/*.json; without --out it writes to a
    temporary folder, and says which."""
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.read_bytes() for p in results.glob("*.json")}
    out = subprocess.run(
        [sys.executable, "-m", "qsbr", "bench", "--quick", "--dir", str(ROOT / "benchmarks"), "core"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == before
    assert "quick run: results go to" in out.stdout


def test_stall_demo_names_the_stuck_reader_and_keeps_the_cap() -> None:
    buf = io.StringIO()
    report = run_demo(seconds=4.0, readers=2, out=buf, stall=True, live=False)
    text = buf.getvalue()
    assert report.ok, text
    assert report.cap_bytes is not None and report.max_backlog_bytes <= report.cap_bytes
    assert {s.thread_name for s in report.stalls} == {"reader-0"}  # repeats name it again
    assert report.stalls[0].report == 1
    assert "STALL: thread 'reader-0'" in text and "within the cap" in text


def test_live_view_renders_with_rich() -> None:
    pytest.importorskip("rich")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Terminal()
    report = run_demo(seconds=1.0, readers=2, out=buf)
    assert report.ok, buf.getvalue()
    assert "grace periods/s" in buf.getvalue() and "backlog (bytes)" in buf.getvalue()


def test_hot_swap_model_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hot_swap_model.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "requests that saw a closed model: 0" in out.stdout


def test_zero_copy_pipeline_example_shows_what_qsbr_prevents() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "zero_copy_pipeline.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "framing: 20,000 frames from" in out.stdout and ", 0 bad checksums" in out.stdout
    assert "qsbr.BufferPool: 0 of 2000 items corrupted" in out.stdout
    naive = int(out.stdout.split("naive pool:")[1].split("of")[0])
    assert naive > 0  # the naive pool does corrupt: the check can fail


native_only = pytest.mark.skipif(qsbr.implementation != "native", reason="SharedCell needs the native kernel")


@native_only
def test_process_demo_kills_a_reader_and_verifies() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qsbr", "demo", "--processes", "2", "--seconds", "3", "--plain"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIGKILLed" in out.stdout and "evicted (1 slot)" in out.stdout
    assert "verified: no torn read, nothing leaked" in out.stdout


def test_process_demo_needs_two_readers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--processes", "1"])
    assert "at least 2" in capsys.readouterr().err


@native_only
def test_bench_shared_quick_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qsbr", "bench", "--quick", "--out", str(tmp_path), "shared"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        env={**__import__("os").environ, "QSBR_BENCH_PEERS": "qsbr"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(next(tmp_path.glob("shared-*.json")).read_text())
    assert set(data["peers"]) == {"qsbr"}
    assert all(r["reads_per_s"] > 0 for r in data["peers"]["qsbr"]["reads"].values())
    assert data["killed_writer"]["qsbr"]["left_in_dev_shm"] == []
