"""Two hosts, as two network namespaces joined by a veth pair: CURVE across them, and the link cut mid-generation."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from amusd_mq.config import SERVICES

A_IP, B_IP = "10.77.0.1", "10.77.0.2"
URL = f"tcp://{A_IP}:5550"  # the namespaces are fresh, so the port is always free
PROMPT = "def fib(n):"
CLIENT = str(Path(__file__).with_name("client_process.py"))
CUT_S = 2.0


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    a: str
    b: str
    link_b: str  # B's end of the veth pair: cutting it there leaves A's own address reachable inside A

    def set_link(self, state: str) -> None:
        ip("-n", self.b, "link", "set", self.link_b, state)

    def client(self, ns: str, max_new_tokens: int, env: dict[str, str], ready_s: float = 120) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, CLIENT, URL, PROMPT, str(max_new_tokens),
                                 "--ready-s", str(ready_s)], env={**os.environ, **env}, stdout=subprocess.PIPE,
                                text=True)


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    netns = shutil.which("ip") and subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    if not netns or netns.returncode:
        pytest.skip("`ip netns` (iproute2) is not available")
    tag = uuid.uuid4().hex[:6]  # unique names: tests may run side by side
    h = Hosts(f"amq-{tag}-a", f"amq-{tag}-b", f"amq{tag}b")
    made = []
    try:
        for ns in (h.a, h.b):
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", f"amq{tag}a", "netns", h.a, "type", "veth", "peer", "name", h.link_b, "netns", h.b)
        for ns, dev, addr in ((h.a, f"amq{tag}a", A_IP), (h.b, h.link_b, B_IP)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def lines(proc: subprocess.Popen, d) -> list[dict]:
    out = [json.loads(line) for line in proc.stdout]
    proc.wait()
    assert out and ("done" in out[-1] or "error" in out[-1]), (out, d.log_tail("coordinator"))
    return out


def test_curve_across_hosts(hosts, deploy, curve_keys, reference, tiny_verify):
    d = deploy(roles=(), AMUSD_COORDINATOR_URL=URL)
    for role in SERVICES:
        d.start(role, netns=hosts.a, **curve_keys[role])
    served = lines(hosts.client(hosts.b, 40, curve_keys["client"]), d)
    assert served[-1].get("done"), served[-1]
    expected = reference(tiny_verify.tokenizer(PROMPT)["input_ids"], 40)
    assert [t for chunk in served[:-1] for t in chunk["ids"]] == expected
    refused = lines(hosts.client(hosts.b, 40, {}, ready_s=1.5), d)
    assert refused == [{"error": "CoordinatorUnavailableError", "message": refused[0]["message"]}]
    assert "requires CURVE keys" in refused[0]["message"]
    d.check_alive()
    assert "handshake_failed" in d.log_tail("coordinator")  # counted and logged


@pytest.mark.parametrize("remote", ["draft", "verify"])
def test_link_cut_and_restored_mid_generation(hosts, deploy, reference, tiny_verify, remote):
    d = deploy(roles=(), AMUSD_COORDINATOR_URL=URL, AMUSD_VERIFY_DELAY_MS=30)
    for role in SERVICES:
        d.start(role, netns=hosts.b if role == remote else hosts.a)
    max_new = 120
    client = hosts.client(hosts.a, max_new, {})
    restore = threading.Timer(CUT_S, hosts.set_link, ["up"])
    out = []
    try:
        for line in client.stdout:
            out.append(json.loads(line))
            if len(out) == 1 and "ids" in out[0]:
                hosts.set_link("down")
                restore.start()
        client.wait()
    finally:
        restore.cancel()
        hosts.set_link("up")
    assert "done" in out[-1], (out[-1], d.log_tail(remote))
    chunks = out[:-1]
    assert [t for c in chunks for t in c["ids"]] == reference(tiny_verify.tokenizer(PROMPT)["input_ids"], max_new)
    elapsed = chunks[-1]["t"] - chunks[0]["t"]
    longest_pause = max(b["t"] - a["t"] for a, b in pairwise(chunks))
    assert elapsed < CUT_S + 10
    if remote == "verify":  # nothing can be committed while the verifier is cut off; it resumes once it is back
        assert CUT_S * 0.75 < longest_pause < CUT_S + 4
    deadline = time.monotonic() + 15
    log = d.log_dir / f"{remote}.log"
    while log.read_text().count("worker registered") < 2:  # the remote worker found its way back
        d.check_alive()
        assert time.monotonic() < deadline, d.log_tail(remote)
        time.sleep(0.2)
