#!/usr/bin/env python
"""Bounded load on the gateway over loopback: throughput, p50/p99 latency, and the gateway's added latency.

    .venv/bin/python benchmarks/gateway_load.py                         # 1,000 requests a scenario, 16 at a time
    .venv/bin/python benchmarks/gateway_load.py --requests 200 --concurrency 8

Scenarios (each bounded by --requests and --deadline seconds):
  local  direct    LocalBackend.generate on a tiny generated Llama, in this process
  local  gateway   the same model through the gateway (a `mergegate serve`-equivalent subprocess), over HTTP
  remote direct    RemoteBackend.generate against a stub OpenAI-compatible upstream (a subprocess)
  remote gateway   the same upstream through the gateway
  upstream killed  through the gateway; the upstream process is killed a third of the way in — the route's
                   fallback (a local model) should answer everything: "lost" counts requests that got no 200.

"added p50" is the gateway's p50 latency over the direct p50 for the same backend at the same concurrency.
Everything listens on 127.0.0.1 only; processes started here are stopped here.

    .venv/bin/python benchmarks/gateway_load.py --peers --requests 300  # mergegate vs LiteLLM's proxy

`--peers` measures instead, against one stub upstream, the upstream direct, mergegate's gateway (a remote-only
plan, routed by X-Cohort) and LiteLLM's proxy at 1, 8 and 32 callers: each proxy's CPU per request (its
process's utime + stime from /proc before and after), added p50/p99 over direct, throughput and its ratio to
LiteLLM's, the start time (process start until its health endpoint answers), and the classifier's amortised
CPU per request (MiniLM, cached and batched, 32 callers over 64 distinct texts). LiteLLM runs from its own
virtual environment, `<work>/litellm-venv`, made on first use (`pip install 'litellm[proxy]'`); when that
fails the LiteLLM rows are skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
MESSAGES = [{"role": "user", "content": "Summarise the release notes in one line."}]

STUB = """
import sys, uvicorn
from mergegate.gateway.testing import StubUpstream
stub = StubUpstream()
stub.set(None, reply=sys.argv[2])
uvicorn.run(stub.app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

GATEWAY = """
import sys
from mergegate.gateway import GatewayConfig, serve
serve(sys.argv[1], port=int(sys.argv[2]), registry=sys.argv[3], log_level="warning", torch_threads=int(sys.argv[4]),
      config=GatewayConfig(backend_timeout=10.0, local_queue_limit=4096, breaker_cooldown=60.0))
"""


@dataclass
class Result:
    scenario: str
    requests: int
    concurrency: int
    ok: int = 0
    lost: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    answered_by: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def q(self, p: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, max(0, int(round(p * len(values))) - 1))] * 1000 if values else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall if self.wall else 0.0


async def load(scenario: str, call, n: int, concurrency: int, deadline: float, on_start=None) -> Result:
    """Issue at most n calls, `concurrency` at a time, starting none after `deadline` seconds."""
    result = Result(scenario, 0, concurrency)
    issued = 0
    started = time.perf_counter()

    async def worker():
        nonlocal issued
        while issued < n and time.perf_counter() - started < deadline:
            index = issued
            issued += 1
            if on_start:
                on_start(index)
            t0 = time.perf_counter()
            try:
                who = await call(index)
            except Exception as exc:  # counted, reported: a lost request
                result.lost += 1
                result.errors[type(exc).__name__] += 1
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.ok += 1
            result.answered_by[who] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall = time.perf_counter() - started
    result.requests = issued
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode} (see its log)")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout} s")


def start(code: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-c", code, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def via_gateway(client: httpx.AsyncClient, cohort: str, max_tokens: int):
    async def call(_index: int) -> str:
        response = await client.post("/v1/chat/completions", json={
            "model": f"cohort/{cohort}", "messages": MESSAGES, "max_tokens": max_tokens})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        return response.json()["model"]
    return call


def direct(backend, request):
    async def call(_index: int) -> str:
        await backend.generate(request)
        return backend.name
    return call


async def main_async(args) -> list[Result]:
    import torch

    from mergegate.demo.samples import write_family
    from mergegate.gateway.backends import LocalBackend, RemoteBackend
    from mergegate.gateway.protocol import GenParams, GenRequest
    from mergegate.rollout import RolloutPlan

    torch.set_num_threads(args.torch_threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="gateway-load-"))
    work.mkdir(parents=True, exist_ok=True)
    family = {"base": work / "family" / "base", "ft1": work / "family" / "ft1"}
    if not all((p / "config.json").is_file() for p in family.values()):
        family = write_family(work / "family", finetunes=1)
    stub_port, gateway_port = free_port(), free_port()
    stub_url = f"http://{HOST}:{stub_port}/v1"
    plan = RolloutPlan.model_validate({
        "candidate": "ft1",
        "models": {"base": {"role": "base", "path": str(family["base"])},
                   "ft1": {"role": "candidate", "path": str(family["ft1"])},
                   "upstream": {"url": stub_url, "upstream_model": "bench"}},
        "routes": {"local": {"model": "base"}, "remote": {"model": "upstream", "fallback": ["ft1"]}},
        "default": {"model": "base"},
    })
    plan_path = plan.save(work / "rollout.yaml")
    registry = work / "registry.sqlite"
    request = GenRequest("chat", GenParams(max_tokens=args.max_tokens), messages=tuple(MESSAGES))
    n, c, deadline = args.requests, args.concurrency, args.deadline
    results: list[Result] = []
    stub = gateway = None
    try:
        stub = start(STUB, [str(stub_port), "stub answer " * 4], work / "stub.log")
        gateway = start(GATEWAY, [str(plan_path), str(gateway_port), str(registry), str(args.torch_threads)],
                        work / "gateway.log")
        wait_ready(f"http://{HOST}:{stub_port}/v1/models", stub, 60)
        wait_ready(f"http://{HOST}:{gateway_port}/healthz", gateway, 300)

        local = LocalBackend("base", family["base"])
        await local.start()
        await local.generate(request)  # warm-up
        results.append(await load("local · direct", direct(local, request), n, c, deadline))
        await local.close()

        limits = httpx.Limits(max_connections=c * 2, max_keepalive_connections=c * 2)
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{gateway_port}", timeout=30, limits=limits,
                                     trust_env=False) as client:
            await via_gateway(client, "local", args.max_tokens)(0)  # warm-up
            results.append(await load("local · gateway", via_gateway(client, "local", args.max_tokens), n, c,
                                      deadline))
            remote = RemoteBackend("upstream", stub_url, upstream_model="bench", timeout=30)
            await remote.start()
            await remote.generate(request)
            results.append(await load("remote · direct", direct(remote, request), n, c, deadline))
            await remote.close()
            await via_gateway(client, "remote", args.max_tokens)(0)
            results.append(await load("remote · gateway", via_gateway(client, "remote", args.max_tokens), n, c,
                                      deadline))

            kill_at = max(1, args.kill_requests // 3)

            def maybe_kill(index: int) -> None:
                if index == kill_at:
                    stub.kill()  # the upstream process this script started

            results.append(await load("remote · gateway, upstream killed at 1/3",
                                      via_gateway(client, "remote", args.max_tokens), args.kill_requests, c,
                                      deadline, on_start=maybe_kill))
            metrics = (await client.get("/metrics")).text
    finally:
        stop(gateway)
        stop(stub)
    breaker = [l for l in metrics.splitlines() if l.startswith(("mergegate_breaker_opened_total{",
                                                                  "mergegate_fallbacks_total{"))]
    report(results, args, breaker)
    return results


def report(results: list[Result], args, gateway_lines: list[str]) -> None:
    direct_p50 = {r.scenario.split(" · ")[0]: r.q(0.5) for r in results if r.scenario.endswith("direct")}
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; max_tokens {args.max_tokens}; "
          f"torch threads {args.torch_threads}\n")
    print("| scenario | requests | concurrency | ok | lost | throughput (req/s) | p50 (ms) | p99 (ms) | added p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        kind = r.scenario.split(" · ")[0]
        added = "—" if r.scenario.endswith("direct") else f"{r.q(0.5) / direct_p50[kind]:.2f}×"
        print(f"| {r.scenario} | {r.requests} | {r.concurrency} | {r.ok} | {r.lost} | {r.throughput:.1f} | "
              f"{r.q(0.5):.1f} | {r.q(0.99):.1f} | {added} |")
    killed = results[-1]
    print(f"\nupstream killed: answered by {dict(killed.answered_by)}; lost {killed.lost}"
          + (f" ({dict(killed.errors)})" if killed.errors else ""))
    for line in gateway_lines:
        print(f"    {line}")


PEER_CALLERS = (1, 8, 32)
LITELLM_CONFIG = """model_list:
  - model_name: bench
    litellm_params: {{model: openai/bench, api_base: "{url}", api_key: stub}}
litellm_settings: {{num_retries: 0, drop_params: true}}
general_settings: {{master_key: sk-bench}}
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def litellm_bin(work: Path) -> tuple[Path | None, str]:
    venv = work / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if binary.is_file():
        return binary, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True,
                       capture_output=True, text=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, f"pip install 'litellm[proxy]' failed: {(getattr(exc, 'stderr', '') or str(exc))[-300:]}"
    return binary, ""


def started(command: list[str], health: str, log: Path, headers: dict | None = None) -> tuple[subprocess.Popen, float]:
    """Start a server; seconds from process start until `health` answers below 500."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode} (log: {log})")
        try:
            if httpx.get(health, timeout=2, trust_env=False, headers=headers).status_code < 500:
                return process, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        if time.perf_counter() - t0 > 300:
            stop(process)
            raise RuntimeError(f"{health} not ready within 300 s")
        time.sleep(0.02)


def post_chat(client: httpx.AsyncClient, path: str, model: str, headers: dict):
    async def call(_index: int) -> str:
        response = await client.post(path, json={"model": model, "messages": MESSAGES, "max_tokens": 4},
                                     headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        return model
    return call


async def measure_peer(name: str, base: str, path: str, model: str, headers: dict, pid: int | None, n: int,
                       deadline: float) -> list[tuple[Result, float | None]]:
    rows = []
    for callers in PEER_CALLERS:
        limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, trust_env=False) as client:
            call = post_chat(client, path, model, headers)
            await load(name, call, min(20, n), callers, deadline)  # warm-up: connections, caches
            before = cpu_seconds(pid) if pid else 0.0
            result = await load(f"{name} · {callers}", call, n, callers, deadline)
            cpu = (cpu_seconds(pid) - before) / max(result.ok, 1) * 1000 if pid else None
        rows.append((result, cpu))
    return rows


async def classifier_cost(n: int) -> tuple[float, float]:
    """(ms CPU per request uncached, one text at a time; ms CPU per request amortised: 32 callers over 64
    distinct texts, cached and batched)."""
    import torch

    from mergegate.gateway.classifier import CohortClassifier, minilm_embedder

    torch.set_num_threads(1)
    embed = minilm_embedder()
    prompts = {"weather": ["What's the weather in Paris tomorrow?", "Will it rain in London this weekend?"],
               "sql": ["Write a SQL query that selects all users older than 30.", "Join orders and customers."]}
    texts = [f"Question {i}: will it rain in city number {i} tomorrow, or should I write SQL {i}?" for i in range(64)]
    alone = CohortClassifier(prompts, embed, 0.35, cache_size=0)
    t0 = time.process_time()
    for text in texts[:16]:
        alone.classify(text)
    uncached = (time.process_time() - t0) / 16 * 1000
    shared = CohortClassifier(prompts, embed, 0.35)

    async def callers():
        left = list(range(n))

        async def caller():
            while left:
                await shared.classify_async(texts[left.pop() % len(texts)])
        await asyncio.gather(*(caller() for _ in range(32)))

    t0 = time.process_time()
    await callers()
    return uncached, (time.process_time() - t0) / n * 1000


async def peers_async(args) -> None:
    from mergegate.rollout import RolloutPlan

    work = Path(args.work or tempfile.mkdtemp(prefix="gateway-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    stub_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    stub_url = f"http://{HOST}:{stub_port}/v1"
    plan = RolloutPlan.model_validate({
        "candidate": "upstream", "models": {"upstream": {"role": "candidate", "url": stub_url,
                                                         "upstream_model": "bench"}},
        "routes": {"remote": {"model": "upstream"}}, "default": {"model": "upstream"}})
    plan_path = plan.save(work / "remote-only.yaml")
    n, deadline = args.requests, args.deadline
    litellm, why_not = litellm_bin(work)
    processes: list[subprocess.Popen] = []
    rows: dict[str, list[tuple[Result, float | None]]] = {}
    starts: dict[str, float] = {}
    try:
        stub, _ = started([sys.executable, "-c", STUB, str(stub_port), "stub answer " * 4],
                          f"{stub_url}/models", work / "stub.log")
        processes.append(stub)
        rows["direct"] = await measure_peer("direct", stub_url, "/chat/completions", "bench", {}, None, n, deadline)
        gateway, starts["mergegate"] = started(
            [sys.executable, "-c", GATEWAY, str(plan_path), str(gateway_port), str(work / "registry.sqlite"), "1"],
            f"http://{HOST}:{gateway_port}/healthz", work / "gateway.log")
        processes.append(gateway)
        rows["mergegate"] = await measure_peer("mergegate", f"http://{HOST}:{gateway_port}", "/v1/chat/completions",
                                               "mergegate", {"X-Cohort": "remote"}, gateway.pid, n, deadline)
        stop(gateway)
        if litellm is not None:
            config = work / "litellm.yaml"
            config.write_text(LITELLM_CONFIG.format(url=stub_url))
            auth = {"Authorization": "Bearer sk-bench"}
            try:
                proxy, starts["LiteLLM"] = started(
                    [str(litellm), "--config", str(config), "--host", HOST, "--port", str(litellm_port),
                     "--num_workers", "1"], f"http://{HOST}:{litellm_port}/health/liveliness", work / "litellm.log")
            except RuntimeError as exc:
                why_not = f"the proxy did not start: {exc}"
            else:
                processes.append(proxy)
                rows["LiteLLM"] = await measure_peer("LiteLLM", f"http://{HOST}:{litellm_port}",
                                                     "/v1/chat/completions", "bench", auth, proxy.pid, n, deadline)
    finally:
        for process in processes:
            stop(process)
    uncached, amortised = await classifier_cost(max(n, 256))
    report_peers(rows, starts, uncached, amortised, why_not)


def report_peers(rows, starts, uncached: float, amortised: float, why_not: str) -> None:
    direct = {r.concurrency: r for r, _ in rows["direct"]}
    peer = {r.concurrency: r for r, _ in rows.get("LiteLLM", [])}
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; stub upstream, max_tokens 4\n")
    print("| proxy | callers | ok | lost | CPU ms/request | p50 ms | p99 ms | added p50 ms | added p99 ms | "
          "req/s | × LiteLLM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, results in rows.items():
        for r, cpu in results:
            c = r.concurrency
            added = ("—", "—") if name == "direct" else (f"{r.q(0.5) - direct[c].q(0.5):.1f}",
                                                          f"{r.q(0.99) - direct[c].q(0.99):.1f}")
            ratio = f"{r.throughput / peer[c].throughput:.1f}×" if c in peer and peer[c].throughput else "—"
            print(f"| {name} | {c} | {r.ok} | {r.lost} | {'—' if cpu is None else f'{cpu:.2f}'} | {r.q(0.5):.1f} | "
                  f"{r.q(0.99):.1f} | {added[0]} | {added[1]} | {r.throughput:.0f} | {ratio} |")
    if why_not:
        print(f"\nLiteLLM skipped: {why_not}")
    print("\nstart (process start until health answers): "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in starts.items()))
    print(f"classifier (MiniLM, 1 torch thread): {uncached:.1f} ms CPU per request uncached; {amortised:.2f} ms "
          "amortised at 32 callers over 64 distinct texts (cache + batching)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kill-requests", type=int, default=None, help="requests in the kill scenario "
                        "(default: --requests)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per scenario before no new requests")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--work", type=str, default=None, help="folder for models, plan, logs (default: a temp dir)")
    parser.add_argument("--peers", action="store_true", help="mergegate vs LiteLLM's proxy on a remote-only plan")
    args = parser.parse_args()
    args.kill_requests = args.kill_requests or args.requests
    asyncio.run(peers_async(args) if args.peers else main_async(args))


if __name__ == "__main__":
    main()
