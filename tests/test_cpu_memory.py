"""phantomdeq.cpu_memory.retain_cpu_memory: freed CPU tensor memory is reused without page faults
(glibc), the ``phantomdeq`` command and the Trainer apply it unless PHANTOMDEQ_CPU_MEMORY=system
(it is not part of the top-level API), and a wrong value of that variable is one line and exit
status 2."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import phantomdeq as pdq
from phantomdeq import cpu_memory
from phantomdeq.cli import main as cli_main

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# 20 blocks of 40 MiB allocated, written and freed in turn (each is 10,240 pages of 4 KiB):
# above glibc's largest mmap threshold (32 MiB), so by default each one is a fresh mapping.
# bytearray(n) is a malloc'd block that CPython zero-fills (every page written), as a CPU tensor
# is; the module is loaded from its file, without torch, so that the probe starts in a moment.
PROBE = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("cpu_memory", sys.argv[2])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if sys.argv[1] == "retain":
        assert mod.retain_cpu_memory()
    for _ in range(3):  # first touches
        b = bytearray(40 << 20); del b
    before = mod.minor_page_faults()
    for _ in range(20):
        b = bytearray(40 << 20); del b
    print(mod.minor_page_faults() - before)
    """
)


def _faults(policy: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, policy, cpu_memory.__file__],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults() -> None:
    pages = (40 << 20) // 4096
    system = _faults("system")
    retain = _faults("retain")
    assert system >= 15 * pages  # a fresh mapping, faulted page by page, each time
    # the freed block is reused: at most a block or two placed anew (glibc may settle it
    # at another address once), instead of twenty fresh mappings
    assert retain <= 2 * pages


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_retain_and_release_return_true_on_glibc() -> None:
    assert cpu_memory.retain_cpu_memory() is True
    assert cpu_memory.retain_cpu_memory(False) is True
    assert (
        cpu_memory.retain_cpu_memory() is True
    )  # leave the faster setting for the rest of the run


def test_not_in_the_top_level_namespace() -> None:
    """A process-wide allocator switch, applied by the command and the Trainer: not model API."""
    assert not hasattr(pdq, "retain_cpu_memory") and "retain_cpu_memory" not in pdq.__all__


def test_not_glibc_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_memory.sys, "platform", "darwin")
    assert cpu_memory.retain_cpu_memory() is False
    monkeypatch.setattr(cpu_memory.sys, "platform", "linux")
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert cpu_memory.retain_cpu_memory() is False


def test_env_policy_values() -> None:
    assert cpu_memory.cpu_memory_from_env({}) == "retain"
    assert cpu_memory.cpu_memory_from_env({"PHANTOMDEQ_CPU_MEMORY": " System "}) == "system"
    with pytest.raises(ValueError, match="PHANTOMDEQ_CPU_MEMORY='keep'.*retain, system"):
        cpu_memory.cpu_memory_from_env({"PHANTOMDEQ_CPU_MEMORY": "keep"})


def test_cli_applies_policy_and_refuses_a_wrong_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("phantomdeq.cli.retain_cpu_memory", lambda: calls.append(True) or True)
    assert cli_main(["configs"]) == 0
    assert calls == [True]
    monkeypatch.setenv("PHANTOMDEQ_CPU_MEMORY", "system")
    assert cli_main(["configs"]) == 0
    assert calls == [True]  # not applied
    capsys.readouterr()
    monkeypatch.setenv("PHANTOMDEQ_CPU_MEMORY", "always")
    assert cli_main(["configs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "PHANTOMDEQ_CPU_MEMORY='always'" in err[0] and "retain, system" in err[0]


def test_ablate_pool_workers_take_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from phantomdeq.experiments.ablation import init_worker

    calls: list[bool] = []
    monkeypatch.setattr(cpu_memory, "retain_cpu_memory", lambda: calls.append(True) or True)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        init_worker(False)
        assert calls == []
        init_worker(True)
        assert calls == [True]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_the_trainer_applies_the_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from phantomdeq.train import Trainer, load_config

    calls: list[bool] = []
    monkeypatch.setattr(cpu_memory, "retain_cpu_memory", lambda: calls.append(True) or True)
    cfg = load_config("mdeq_tiny_digits")
    monkeypatch.setenv("PHANTOMDEQ_CPU_MEMORY", "system")
    Trainer(cfg, tmp_path / "a")
    assert calls == []
    monkeypatch.delenv("PHANTOMDEQ_CPU_MEMORY")
    Trainer(cfg, tmp_path / "b")
    assert calls == [True]
    monkeypatch.setenv("PHANTOMDEQ_CPU_MEMORY", "always")
    with pytest.raises(ValueError, match="PHANTOMDEQ_CPU_MEMORY"):
        Trainer(cfg, tmp_path / "c")
