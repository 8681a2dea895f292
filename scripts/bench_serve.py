#!/usr/bin/env python3
"""Aggregate generated tokens/s and time to first token of `uc serve` with 1, 4 and 8
concurrent clients, and of llama.cpp's llama-server on a GGUF when one is given, in one
invocation, with each server's peak RSS; writes JSON (default results/bench_serve.json).

    python3 scripts/bench_serve.py --pack packs/smollm2-135m-default
    python3 scripts/bench_serve.py --pack packs/smollm2-135m-default \
        --llama-server PATH/llama-server --gguf SmolLM2-135M-Instruct.Q4_K_M.gguf

Each client sends --requests streaming /v1/completions requests one after another
(temperature 0, the same prompt with the client's number appended, max_tokens tokens);
TTFT is the time from sending to the first non-empty text chunk; generated tokens come
from the usage chunk (stream_options.include_usage). Both servers get --threads threads
and --clients-max parallel slots. Standard library only.
"""
import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

PROMPT = ("The President addressed the nation on the state of the economy, the budget, "
          "and the years ahead. He said that")


def stream_request(host, port, model, prompt, max_tokens):
    """One streaming completion; returns (ttft_s, total_s, completion_tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:300]!r}")
    ttft, tokens = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        for ch in ev.get("choices") or []:
            if ch.get("text") and ttft is None:
                ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    c.close()
    return ttft, total, tokens


def run_level(host, port, model, clients, requests, max_tokens):
    results, errors = [], []

    def client(i):
        for j in range(requests):
            try:
                results.append(stream_request(host, port, model, f"{PROMPT} ({i}.{j})", max_tokens))
            except Exception as e:  # recorded, not hidden
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(r[2] or 0 for r in results)
    ttfts = [r[0] for r in results if r[0] is not None]
    return {
        "clients": clients, "requests": len(results), "errors": errors,
        "generated_tokens": toks, "wall_s": wall,
        "aggregate_tokens_per_s": toks / wall if wall > 0 else 0.0,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_max_s": max(ttfts) if ttfts else None,
    }


def wait_health(port, proc, seconds=300):
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def bench(name, cmd, port, model, a):
    load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_health(port, proc)
        run_level("127.0.0.1", port, model, 1, 1, 8)  # warm-up, not recorded
        levels = [run_level("127.0.0.1", port, model, c, a.requests, a.max_tokens)
                  for c in a.clients]
        peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    return {"server": name, "command": " ".join(cmd), "peak_rss_mib": peak,
            "loadavg_before": load, "levels": levels}


def peak_rss_mib(pid):
    """The server's resident high-water mark (VmHWM), MiB; None where /proc is missing."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", required=True)
    ap.add_argument("--uc", default="target/release/uc")
    ap.add_argument("--llama-server")
    ap.add_argument("--gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--out", default="results/bench_serve.json")
    a = ap.parse_args()
    a.clients = [int(c) for c in a.clients.split(",")]
    slots = max(a.clients)
    model = os.path.basename(os.path.normpath(a.pack))
    rows = [bench("uc serve", [a.uc, "serve", a.pack, "--port", str(a.port), "--threads",
                               str(a.threads), "--max-batch", str(slots), "--ctx-size", "1024",
                               "--model-id", model], a.port, model, a)]
    if a.llama_server and a.gguf:
        rows.append(bench("llama-server", [a.llama_server, "-m", a.gguf, "--port", str(a.port + 1),
                                           "-t", str(a.threads), "-np", str(slots),
                                           "-c", str(1024 * slots), "--alias", model],
                          a.port + 1, model, a))
    out = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "max_tokens": a.max_tokens, "rows": rows,
           # Kernel switches (UC_PREFILL, UC_MATVEC) the uc server inherited, if any.
           "uc_env": {k: v for k, v in os.environ.items() if k in ("UC_PREFILL", "UC_MATVEC")}}
    if len(rows) == 2:
        out["ratio_uc_over_llama_server"] = [
            {"clients": u["clients"],
             "aggregate_tokens_per_s": u["aggregate_tokens_per_s"] / l["aggregate_tokens_per_s"],
             "ttft_median": (u["ttft_median_s"] / l["ttft_median_s"]) if l["ttft_median_s"] else None}
            for u, l in zip(rows[0]["levels"], rows[1]["levels"])]
    else:
        out["llama_server"] = "not run: give --llama-server and --gguf"
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump(out, open(a.out, "w"), indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
