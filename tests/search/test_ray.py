"""`--backend ray`: workers sharing one study give the run directory of a local run, and a local Ray instance
listens on loopback only (its processes' listening sockets, read from /proc); option checks."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import socket
import threading
from pathlib import Path

import pytest
from helpers import study_trials, tiny_config, write_config
from optuna.trial import TrialState

from slimformer.api import search
from slimformer.errors import ConfigError
from slimformer.search.records import counted_trials
from slimformer.search.storage import WORKER_ATTR, default_url

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed: pip install 'slimformer[ray]'")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _listening_sockets() -> dict[str, tuple[str, int]]:
    """Listening TCP sockets of this network namespace by inode: (address, port), from /proc/net/tcp{,6}."""
    out: dict[str, tuple[str, int]] = {}
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            ip_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(ip_hex)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host order
            out[cols[9]] = (socket.inet_ntop(family, raw), int(port_hex, 16))
    return out


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def _listeners_of_tree(root: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket held by `root` or its descendants."""
    table = _listening_sockets()
    found = set()
    for pid in _process_tree(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in table:
                found.add((name, *table[link[8:-1]]))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _form(run_dir: Path) -> set[str]:
    pareto = json.loads((run_dir / "pareto.json").read_text())["trials"]
    assert pareto
    assert {p.name for p in (run_dir / "recipes").glob("*.yaml")} == {f"trial-{e['trial']}.yaml" for e in pareto}
    return {p.name for p in run_dir.iterdir()}


@needs_ray
def test_two_ray_workers_give_the_run_directory_of_a_local_run(tmp_path: Path, tiny_model_dir: Path,
                                                               shared_run) -> None:
    requested = 12
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run", trials=requested))
    lines: list[str] = []
    seen: set[tuple[str, str, int]] = set()
    done = threading.Event()

    def watch() -> None:  # while Ray is up: the listening sockets of this process and everything it started
        while not done.wait(0.2):
            seen.update(_listeners_of_tree(os.getpid()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = search(cfg_path, progress=False, backend="ray", workers=2, log=lines.append)
    finally:
        done.set()
        watcher.join()
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), seen
    assert all(_is_loopback(addr) for _, addr, _ in seen), f"Ray listens beyond loopback: {sorted(seen)}"
    assert any("ray: 2 worker(s) x 1 torch thread(s)" in ln for ln in lines), lines
    assert res.storage == default_url(tmp_path / "run")
    assert _form(tmp_path / "run") == _form(shared_run[1]), "same files as a local run (study.db included)"
    trials = study_trials(res.storage)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t._trial_id for t in trials}) == len(trials)
    assert all(t.state in FINISHED for t in trials)
    assert counted_trials(trials) == requested
    workers = {t.system_attrs.get(WORKER_ATTR) for t in trials if t.user_attrs.get("feasible") is not None}
    assert None not in workers and 1 <= len(workers) <= 2
    assert sum(res.summary.trial_states.values()) == len(trials)

    more = search(cfg_path, progress=False, trials=requested + 2)  # a local run resumes a Ray run's study
    assert counted_trials(study_trials(more.storage)) == requested + 2


def test_backend_options_are_checked_before_anything_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg_path = write_config(tmp_path / "search.yaml", tiny_config(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ConfigError, match="--address and --workers apply to --backend ray"):
        search(cfg_path, progress=False, workers=2)
    with pytest.raises(ConfigError, match="--backend 'dask'"):
        search(cfg_path, progress=False, backend="dask")
    if importlib.util.find_spec("ray") is not None:
        with pytest.raises(ConfigError, match="--address ray://head:10001: workers on other machines cannot share"):
            search(cfg_path, progress=False, backend="ray", address="ray://head:10001")
        with pytest.raises(ConfigError, match="cannot share sqlite:///x.db"):
            search(cfg_path, progress=False, backend="ray", address="ray://head:10001", storage="sqlite:///x.db")
    assert not (tmp_path / "run").exists()
