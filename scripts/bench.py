#!/usr/bin/env python3
"""The benchmark driver behind scripts/bench.sh (issues 5, 11, 12, 13). Standard library only.

It starts Mosquitto, vllm-sim, mqtt-echo, Redis and vllm-mqttd on loopback (free
ports), drives them with vllm-stress and selfbench, and prints ONE markdown
table (scenario, metric, value, baseline, ratio, target, met?). Every
scenario measures its own baseline in the same run. It writes every raw
number, plus the machine it ran on, to bench/results/<YYYY-MM-DD>.json.

Scenarios:
  1 overhead    sim with zero latency, 64 closed-loop sessions: mqtt-echo (the
                MQTT round-trip floor), the sim over HTTP (selfbench --url),
                and the daemon; added latency and CPU per request.
  2 saturation  sim with max-num-seqs 32 and 64-token replies; the sim's own
                best throughput (selfbench at 32/64/128), then the daemon
                offered 2x that open loop: goodput ratio, rejection p99, lost.
  3 burst       20 000 requests from 20 000 sessions within 1 s, queue 1000:
                accounting, overload-reply p99 (mqtt-echo under the same
                burst is the baseline), peak RSS.
  4 sessions    100 000 sessions, one short turn each: RSS per session.
  5 workers     --num-workers 1..64 against max-num-seqs 32: goodput and p99.
  6 routing     (issue 11) --routing affinity | least-loaded | round-robin over 3
                sims with a small prefix cache each, a ~1500-token project system
                prompt, closed-loop sessions of several turns: time to first token
                p50/p99 (the sims' vllm:time_to_first_token_seconds histograms,
                summed, quantiles as Prometheus's histogram_quantile), prefix-cache
                hit rate (hits/queries over the sims), throughput; ratios against
                round-robin. Target: affinity TTFT p50 <= 0.5x, throughput >= 1x.
  7 auto        (issue 11) --num-workers auto vs 8 against one sim with
                max-num-seqs 8, 32 and 128, offered 2x the sim's own best
                throughput (selfbench at max-num-seqs and twice that, as in 2):
                goodput ratio, and the sim's vllm:num_requests_waiting sampled
                every 0.25 s. Target: auto >= 0.95 with the waiting queue near 0.
  8 failover    (issue 11) 3 sims, an open loop, one sim SIGKILLed mid-run:
                lost and error replies from vllm-stress's accounting (both 0).
  9 store cost  (issue 12) one daemon, zero-latency sim, --state-url memory
                (baseline) vs redis://, alternated in each repetition: an open
                loop at half the lower closed-loop throughput (measured first):
                added latency p50/p99 (target p50 <= 0.5 ms), daemon CPU per
                request and its ratio, store round trips per request (Redis's
                INFO commandstats before and after).
  10 instances  (issue 12) 1, 2 and 4 daemons in one share group on one
                Mosquitto and one Redis, a zero-latency sim: closed-loop
                throughput and its ratio to 1 instance, the CPU split (daemons,
                mosquitto, redis, sim, stress client, other users of the
                machine from /proc/stat), every request answered.
  11 streaming  (issue 13) a sim with a fixed latency model (TTFT 30 ms, ITL
                15 ms whatever the batch, prompts cost nothing, 64-token
                replies, max-num-seqs 1024 so that nothing queues). The rate:
                a fraction (0.15) of what a closed loop of 1000 streamed
                sessions through the daemon reaches (measured first). Then,
                alternated in each repetition: HTTP direct (selfbench --stream
                --rate, the baseline: time to first token), vllm-stress
                --stream and the same without --stream through Mosquitto and
                a daemon at the default --stream-interval (50 ms), all open
                loop at that rate. Added time to first delta p50/p99 = MQTT
                TTFD - HTTP TTFT (target p50 <= 2 ms), deltas and messages per
                streamed request (against the model's count), deltas lost,
                daemon CPU per request streamed vs not, and its ratio.

Each measurement is repeated (3 times; once with --quick; 7 once unless
--reps is given, it is the longest) and the table
shows medians; ratios are the median of the per-repetition ratios (each
repetition measures value and baseline back to back).

Run it through scripts/bench.sh, which builds first. Processes are started
in their own process groups and stopped on exit, error, Ctrl-C or SIGTERM;
their pids also go to $BENCH_PIDFILE so that the shell's trap can stop any
left behind.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# cargo's target directory: $CARGO_TARGET_DIR if set (relative to the
# workspace, where bench.sh runs cargo), else target/.
_TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
REL = (_TARGET if _TARGET.is_absolute() else ROOT / _TARGET) / "release"
BINS = {
    "daemon": REL / "vllm-mqttd",
    "stress": REL / "vllm-stress",
    "echo": REL / "mqtt-echo",
    "sim": REL / "vllm-sim",
    "selfbench": REL / "examples" / "selfbench",
    "chat": REL / "vllm-chat",
}
MOSQUITTO = os.environ.get("MOSQUITTO", "/usr/sbin/mosquitto")
# Scenarios 9 and 10 (issue 12): the shared store (bench.sh installs it).
REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = os.environ.get("REDIS_CLI") or shutil.which("redis-cli") or "/usr/bin/redis-cli"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Settings: full and --quick


def settings(quick):
    s = {
        "reps": 3,
        # 1 overhead
        "ovh_clients": 64,
        "ovh_messages": 300,  # per client: 19 200 requests
        "ovh_warmup_messages": 10,
        "ovh_http_secs": 4.0,
        "ovh_light_rate": 500,  # supplementary: evenly spaced, well below capacity
        "ovh_light_secs": 4.0,
        # 2 saturation (and the sim for 5)
        "sat_seqs": 32,
        "sat_tokens": 64,
        "sat_sim_concurrencies": [32, 64, 128],
        "sat_sim_secs": 8.0,
        "sat_sim_warmup": 3.0,
        "sat_secs": 30.0,
        "sat_warm": 5.0,  # goodput counts ok replies completed in [warm, secs]
        "sat_workers": 32,
        "sat_queue": 32,
        "sat_echo_secs": 5.0,
        # 3 burst
        "burst_requests": 20000,
        "burst_queue": 1000,
        "burst_workers": 32,
        "burst_tokens": 8,
        # the noisiest figure (the whole machine is CPU-bound during the burst),
        # and a repetition takes 10 s: 5 of them
        "burst_reps": 5,
        # 4 sessions
        "sess_sessions": 100000,
        "sess_rate": 4000,
        "sess_message": "hi",
        # 5 worker sweep
        "sweep_workers": [1, 2, 4, 8, 16, 32, 64],
        "sweep_secs": 12.0,
        "sweep_warm": 3.0,
        "sweep_queue": 32,
        # 6 routing: 3 sims, a long project system prompt, multi-turn sessions
        "rt_sims": 3,
        "rt_seqs": 16,
        "rt_tokens": 48,  # reply length (fixed)
        "rt_system_tokens": 1500,
        "rt_ttft_ms": 10.0,  # prefill: 10 ms + 0.1 ms per uncached prompt token
        "rt_ttft_per_token_ms": 0.1,
        # Phase 1, time to first token: an open loop well below the pool's
        # capacity over a fixed set of sessions, so that each session gets
        # rate x secs / sessions turns, one every sessions / rate seconds.
        # (vllm-stress numbers every request "(#n)" over the whole run, so
        # the sessions' histories differ; its closed loop numbers each
        # client's turns alike, and identical conversations would share
        # their cache blocks.) Fixed workers: nothing waits in the daemon.
        # vllm-stress hands requests to the sessions in a fixed cycle, and
        # round-robin cycles over the sims: with a number of sessions that
        # is a multiple of the number of sims, every turn of a session would
        # reach the same sim, and round-robin would be affinity by accident.
        # With 44 sessions over 3 sims, a session's turns visit the sims in
        # turn (each sim saw the session's conversation 3 turns before).
        "rt_rate": 30.0,
        "rt_sessions": 44,
        "rt_secs": 12.0,  # 8 turns per session
        "rt_workers": 48,
        # Phase 2, throughput: the same sims (caches as phase 1 left them),
        # the default --num-workers auto, offered 1.5x the pool's modelled
        # capacity; goodput in [warm, secs].
        "rt_sat_factor": 1.5,
        "rt_sat_secs": 12.0,
        "rt_sat_warm": 4.0,
        "rt_sat_sessions": 148,  # not a multiple of rt_sims either
        "rt_sat_queue": 64,
        # prefix cache per sim: the system prompt plus this many times the
        # final history of its share of the sessions (affinity's working set)
        "rt_cache_factor": 1.4,
        "rt_policies": ["round-robin", "least-loaded", "affinity"],
        # 7 auto: --num-workers auto vs 8 against one sim per batch size
        "auto_seqs": [8, 32, 128],
        # Reply lengths uniform in [tokens/2, 3 tokens/2] (mean `tokens`): with
        # one fixed length, the requests admitted together (auto doubles its
        # limit at once) would also finish together, every request duration,
        # and a window's count of replies would swing by a whole batch.
        "auto_tokens": 64,
        "auto_fixed": 8,
        "auto_queue": 32,
        # auto's slow start reaches 128 in about 10 s, overshoots to 256 for
        # 2 scrapes, and the requests it queued in the sim then take a
        # request's duration to drain: the window starts after that.
        "auto_warm": 14.0,  # plus 1.5 request durations at a full batch
        "auto_window": 20.0,  # goodput window after the warm-up
        "auto_reps": 1,
        "auto_max_at": [1, 2],  # the sim's max: selfbench at these multiples of max-num-seqs
        "auto_with_fixed": True,  # also the fixed-workers baseline runs
        # 8 failover: 3 sims, one SIGKILLed mid-load
        "fo_sims": 3,
        "fo_seqs": 16,
        "fo_tokens": 64,  # about 0.6 s each: ~6 in flight per sim at the kill
        "fo_rate": 30.0,
        "fo_secs": 20.0,
        "fo_kill_at": 8.0,
        "fo_sessions": 300,
        # 9 store cost: one daemon, zero-latency sim, --state-url memory vs redis
        "sc_clients": 64,  # closed loop: the saturated throughput, which sets the rate
        "sc_messages": 100,
        "sc_warmup_messages": 10,
        "sc_rate_fraction": 0.5,  # the open loop: this fraction of the lower saturated throughput
        "sc_rate": None,  # or a fixed rate, req/s
        "sc_secs": 10.0,
        "sc_sessions": 1000,  # each session a few requests per second, none busy
        "sc_workers": 64,
        # 10 instances: 1, 2, 4 daemons in one share group, one Redis
        "inst_counts": [1, 2, 4],
        "inst_clients": 128,  # closed-loop sessions: enough to keep 4 instances busy
        "inst_messages": 200,  # per session: 25 600 requests per run
        "inst_warmup_messages": 5,
        "inst_workers": 128,  # per instance: never the limit
        "inst_group": "bench",
        # 11 streaming: a fixed latency model, an open loop well below saturation
        "st_seqs": 1024,  # the sim never queues, the calibration's sessions included
        "st_tokens": 64,  # fixed reply length
        "st_ttft_ms": 30.0,  # fixed: --ttft-per-token-ms 0, prompts cost nothing
        "st_itl_ms": 15.0,  # fixed: --itl-per-seq-ms 0, whatever the batch
        "st_interval_ms": 50.0,  # the daemon's default --stream-interval (not passed; for the model)
        "st_calib_clients": 1000,  # closed-loop streamed sessions: the machine's limit, which sets the rate
        "st_calib_messages": 6,
        "st_rate_fraction": 0.15,  # the open loop: this fraction of the calibration's throughput
        "st_rate": None,  # or a fixed rate, req/s
        "st_secs": 10.0,
        "st_warmup_secs": 2.0,  # each run: this long at the same rate first, not measured
        "st_sessions": 500,  # a turn every 5 s per session at 100 req/s, a turn lasting 1 s
        "st_workers": 1024,  # nothing waits in the daemon, the calibration included
    }
    if quick:
        s.update(
            reps=1,
            burst_reps=1,
            ovh_messages=100,
            ovh_warmup_messages=5,
            ovh_http_secs=2.0,
            ovh_light_secs=2.0,
            sat_sim_secs=4.0,
            sat_sim_warmup=1.5,
            sat_secs=10.0,
            sat_warm=3.0,
            sat_echo_secs=3.0,
            sess_sessions=20000,
            sweep_secs=6.0,
            sweep_warm=2.0,
            rt_secs=8.0,
            rt_sessions=40,  # 6 turns
            rt_sat_secs=8.0,
            rt_sat_warm=3.0,
            rt_policies=["round-robin", "affinity"],
            auto_warm=12.0,
            auto_window=6.0,
            auto_max_at=[1],
            auto_with_fixed=False,
            fo_secs=10.0,
            fo_kill_at=4.0,
            sc_messages=50,
            sc_warmup_messages=5,
            sc_secs=4.0,
            inst_messages=60,
            inst_warmup_messages=3,
            st_calib_messages=3,
            st_secs=4.0,
            st_warmup_secs=1.0,
        )
    return s


# --------------------------------------------------------------------------
# Processes


class Procs:
    """Every process we start, each in its own process group."""

    def __init__(self, workdir, pidfile):
        self.workdir = workdir
        self.pidfile = pidfile
        self.live = []

    def start(self, name, argv, cwd=None):
        logf = open(self.workdir / f"{name}.log", "wb")
        p = subprocess.Popen(
            [str(a) for a in argv],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
        self.live.append(p)
        p.bench_name = name
        p.bench_log = self.workdir / f"{name}.log"
        logf.close()
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{p.pid} {argv[0]}\n")
        return p

    def run(self, name, argv):
        """Starts a load generator and waits for it; returns (proc, status)."""
        p = self.start(name, argv)
        try:
            rc = p.wait()
        finally:
            self.stop(p)
        return p, rc

    def stop(self, p, timeout=10.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{p.bench_name} did not stop on SIGTERM; SIGKILL")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in reversed(list(self.live)):
            try:
                self.stop(p, timeout=5.0)
            except Exception as e:  # keep stopping the others
                log(f"cannot stop {p.bench_name}: {e}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, pred, timeout=20.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: process exited with {proc.returncode}; log {proc.bench_log}:\n"
                + tail(proc.bench_log)
            )
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def tail(path, n=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def port_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def http_ok(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


# --------------------------------------------------------------------------
# /proc


def clk_tck():
    try:
        return int(subprocess.check_output(["getconf", "CLK_TCK"], text=True).strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        return os.sysconf("SC_CLK_TCK")


CLK_TCK = clk_tck()


def cpu_secs(pid):
    """utime + stime of a process, in seconds, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def mem_kib(pid):
    """VmRSS and VmHWM in KiB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def proc_stat():
    """The machine's CPU time so far, in ticks, from /proc/stat's cpu line:
    busy (user, nice, system, irq, softirq), idle (idle, iowait), steal."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    f += [0] * (8 - len(f))
    return {"busy": f[0] + f[1] + f[2] + f[5] + f[6], "idle": f[3] + f[4], "steal": f[7]}


def loadavg():
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def redis_cli(port, *args):
    """A redis-cli command's output, stripped ("" if it cannot run)."""
    try:
        r = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *map(str, args)],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.strip()


def redis_stats(port):
    """Redis's command counts: {"calls": {command: calls}, "total_commands_processed": n}."""
    calls, total = {}, None
    for line in redis_cli(port, "info", "stats", "commandstats").splitlines():
        k, _, v = line.strip().partition(":")
        if k.startswith("cmdstat_"):
            m = re.search(r"calls=(\d+)", v)
            if m:
                calls[k[len("cmdstat_"):]] = int(m.group(1))
        elif k == "total_commands_processed":
            total = int(v)
    if total is None:
        raise RuntimeError(f"redis-cli -p {port} info: no total_commands_processed")
    return {"calls": calls, "total_commands_processed": total}


def metrics(port):
    """The daemon's Prometheus text as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            pass
    return out


def requests_counted(m):
    return sum(v for k, v in m.items() if k.startswith("vllm_mqttd_requests_total"))


def msum(m, name):
    """Sum of a metric over its series (every label set)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def label(key, name):
    """A label's value in a series key such as name{a="x",b="y"}."""
    m = re.search(name + r'="([^"]*)"', key)
    return m.group(1) if m else None


def hist(m, name):
    """A histogram's cumulative buckets {upper bound: count}, summed over its series."""
    out = {}
    pre = name + "_bucket{"
    for k, v in m.items():
        if k.startswith(pre):
            le = label(k, "le")
            b = math.inf if le == "+Inf" else float(le)
            out[b] = out.get(b, 0.0) + v
    return out


def hist_add(a, b, sign=1.0):
    return {le: a.get(le, 0.0) + sign * b.get(le, 0.0) for le in set(a) | set(b)}


def hist_quantile(q, buckets):
    """Prometheus's histogram_quantile: the bucket holding rank q, linear
    inside it (the first bucket starts at 0; in +Inf: the last finite bound)."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    lo, below = 0.0, 0.0
    for le, c in items:
        if c >= rank:
            if le == math.inf:
                return lo
            return le if c == below else lo + (le - lo) * (rank - below) / (c - below)
        lo, below = le, c
    return lo


class Sampler(threading.Thread):
    """Reads /metrics of some ports every `every` s into (t, [metrics or None])."""

    def __init__(self, ports, every=0.25):
        super().__init__(daemon=True)
        self.ports = list(ports)
        self.every = every
        self.samples = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            t = time.monotonic()
            row = []
            for port in self.ports:
                try:
                    row.append(metrics(port))
                except (OSError, ValueError):
                    row.append(None)
            self.samples.append((t, row))
            self.done.wait(self.every)

    def stop(self):
        self.done.set()
        self.join(5)

    def series(self, i, name, t0=None, t1=None):
        """Values of metric `name` (summed over labels) at port i within [t0, t1]."""
        return [
            msum(row[i], name) for t, row in self.samples
            if row[i] is not None and (t0 is None or t >= t0) and (t1 is None or t <= t1)
        ]


# --------------------------------------------------------------------------
# What vllm-sim does with a prompt (sim/src/openai.rs): a token is 4 bytes of
# the ChatML-templated prompt; a reply is "echo: <last user message>" cut into
# words (each with its trailing spaces), then filler words.

SIM_BYTES_PER_TOKEN = 4
SIM_FILLER = [" the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog."]


def sim_words(text):
    pieces, cur, seen, space = [], "", False, False
    for ch in text:
        if ch.isspace():
            space = True
        else:
            if space and seen:
                pieces.append(cur)
                cur = ""
            space, seen = False, True
        cur += ch
    if cur:
        pieces.append(cur)
    return pieces


def sim_reply(message, tokens):
    w = sim_words(f"echo: {message}")
    return "".join(w[i] if i < len(w) else SIM_FILLER[(i - len(w)) % len(SIM_FILLER)] for i in range(tokens))


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def project_system_prompt(tokens):
    """A long project system prompt of about `tokens` sim tokens: a
    warehouse-robot assistant's numbered operating rules."""
    head = ("You are the assistant of the Northfield warehouse robots. Answer operators "
            "briefly and precisely, in the language they use. Follow these operating rules.\n")
    verbs = ["check", "report", "confirm", "log", "avoid", "reroute", "pause", "verify"]
    things = ["aisle", "shelf", "charging dock", "loading bay", "conveyor", "pallet", "door", "lift"]
    rules, n = [head], 1
    while sum(map(len, rules)) < tokens * SIM_BYTES_PER_TOKEN:
        v, th = verbs[n % len(verbs)], things[(n * 3) % len(things)]
        rules.append(f"Rule {n}: before moving past {th} {n % 17 + 1}, {v} its state, and if a "
                     f"person is within {n % 5 + 2} metres, stop and wait {n % 9 + 3} seconds.\n")
        n += 1
    return "".join(rules)


# --------------------------------------------------------------------------
# Statistics


def pct(values, p):
    """Nearest-rank percentile (p in [0, 100]); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(p / 100.0 * len(v)) - 1))
    return v[k]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------
# The system under test


class Bench:
    def __init__(self, args, workdir, pidfile):
        self.args = args
        self.s = settings(args.quick)
        self.workdir = workdir
        self.procs = Procs(workdir, pidfile)
        self.seq = 0
        self.run_tag = "%06x" % random.getrandbits(24)

    def name(self, base):
        self.seq += 1
        return f"{self.seq:03d}-{base}"

    # ---- components

    def mosquitto(self):
        port = free_port()
        name = self.name("mosquitto")
        conf = self.workdir / f"{name}.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        p = self.procs.start(name, [MOSQUITTO, "-c", conf])
        wait_for("mosquitto", lambda: port_open(port), proc=p)
        p.port = port
        return p

    def sim(self, *extra):
        port = free_port()
        p = self.procs.start(
            self.name("vllm-sim"),
            [BINS["sim"], "--host", "127.0.0.1", "--port", port, "--seed", "1", *extra],
        )
        wait_for("vllm-sim", lambda: http_ok(f"http://127.0.0.1:{port}/v1/models"), proc=p)
        p.port = port
        p.url = f"http://127.0.0.1:{port}/v1"
        return p

    def echo(self, broker):
        p = self.procs.start(
            self.name("mqtt-echo"),
            [BINS["echo"], "--mqtt-host", "127.0.0.1", "--mqtt-port", broker.port],
        )
        wait_for("mqtt-echo", lambda: "serving" in p.bench_log.read_text(), proc=p)
        # It logs when it queues its SUBSCRIBE, not on the SUBACK: give the
        # broker a moment before the first request.
        time.sleep(0.3)
        return p

    def daemon(self, broker, sim, workers, queue, max_sessions=10000, extra=(), config=None):
        """The daemon against `sim` (one sim, or a list: one --backend-url
        each); `extra` flags go last (they win), `config` is a TOML file."""
        mport = free_port()
        name = self.name(f"vllm-mqttd-w{workers}")
        ident = f"bench-{self.run_tag}-{self.seq}"
        sims = sim if isinstance(sim, (list, tuple)) else [sim]
        argv = [
            BINS["daemon"],
            *(["--config", config] if config else []),
            "--mqtt-host", "127.0.0.1",
            "--mqtt-port", broker.port,
            "--mqtt-client-id", ident,
            "--instance-id", ident,
            *[a for s in sims for a in ("--backend-url", s.url)],
            "--num-workers", workers,
            "--max-queue-size", queue,
            "--max-sessions", max_sessions,
            "--rate-limit", "1000000",
            "--request-timeout", "5m",
            "--shutdown-grace", "2s",
            "--stats-interval", "1h",
            "--metrics-addr", f"127.0.0.1:{mport}",
            *extra,
        ]
        p = self.procs.start(name, argv)

        def ready():
            t = p.bench_log.read_text()
            # One "models discovered" line per backend (older builds: one
            # "model discovered" line): wait for every backend's.
            found = t.count("models discovered") or t.count("model discovered")
            return "subscribed" in t and found >= len(sims)

        wait_for("vllm-mqttd", ready, proc=p)
        wait_for("vllm-mqttd metrics", lambda: http_ok(f"http://127.0.0.1:{mport}/metrics"), proc=p)
        p.metrics_port = mport
        p.argv = [str(a) for a in argv]
        return p

    # ---- load generators

    def stress(self, broker, load, tag, message=None, reply_timeout="120s"):
        """Runs vllm-stress; returns (summary, records). load: list of flags."""
        name = self.name(f"stress-{tag}")
        js = self.workdir / f"{name}.json"
        rec = self.workdir / f"{name}.csv"
        argv = [
            BINS["stress"],
            "--mqtt-host", "127.0.0.1",
            "--mqtt-port", broker.port,
            "-q",
            "--reply-timeout", reply_timeout,
            "--json", js,
            "--records", rec,
            *load,
        ]
        if message is not None:
            argv += ["--message", message]
        argv = [str(a) for a in argv]
        # The client's own CPU: it is the only child reaped meanwhile.
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p, rc = self.procs.run(name, argv)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if rc not in (0, 1):  # 1: some request was lost, which we report
            raise RuntimeError(f"vllm-stress failed ({rc}): {' '.join(argv)}\n" + tail(p.bench_log))
        summary = json.loads(js.read_text())
        records = []
        with open(rec) as f:
            next(f)
            for line in f:
                # sent_ms,latency_ms,outcome,attempts (and with --stream
                # ttfd_ms,deltas,deltas_lost,max_gap_ms,messages)
                sent, lat, outcome = line.rstrip("\n").split(",")[:3]
                records.append((float(sent), float(lat) if lat else None, outcome))
        summary["command"] = " ".join(argv)
        summary["client_cpu_secs"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        return summary, records

    def selfbench(self, url, clients, secs, warmup, max_tokens, tag, rate=None, stream=False):
        """selfbench against `url`: `clients` closed loop, or an open loop at
        `rate` req/s; `stream` asks for SSE (and measures TTFT)."""
        name = self.name(f"selfbench-{tag}")
        js = self.workdir / f"{name}.json"
        argv = [
            str(a)
            for a in [
                BINS["selfbench"],
                "--url", url,
                "--clients", clients,
                "--secs", secs,
                "--warmup-secs", warmup,
                "--ramp-secs", min(1.0, warmup),
                "--max-tokens", max_tokens,
                "--json", js,
                *(["--rate", rate] if rate is not None else []),
                *(["--stream"] if stream else []),
            ]
        ]
        p, rc = self.procs.run(name, argv)
        if rc != 0:
            raise RuntimeError(f"selfbench failed ({rc}): {' '.join(argv)}\n" + tail(p.bench_log))
        r = json.loads(js.read_text())
        r["command"] = " ".join(argv)
        return r

    # ---------------------------------------------------------------------
    # 1. Overhead

    def overhead(self):
        s = self.s
        c, m = s["ovh_clients"], s["ovh_messages"]
        closed = ["--clients", c, "--messages", m, "--interval", "0s"]
        warm = ["--clients", c, "--messages", s["ovh_warmup_messages"], "--interval", "0s"]
        light = [
            "--rate", f"{s['ovh_light_rate']}/s",
            "--duration", f"{s['ovh_light_secs']}s",
            "--sessions", c,
        ]
        sim = self.sim("--latency-scale", "0", "--output-tokens", "text")
        reps = []
        try:
            for rep in range(s["reps"]):
                log(f"1 overhead: repetition {rep + 1}/{s['reps']}")
                r = {}
                # (a) the MQTT round-trip floor
                broker = self.mosquitto()
                echo = self.echo(broker)
                self.stress(broker, warm, "echo-warmup")
                cpu0 = {"echo": cpu_secs(echo.pid), "broker": cpu_secs(broker.pid)}
                summ, _ = self.stress(broker, closed, "echo")
                cpu1 = {"echo": cpu_secs(echo.pid), "broker": cpu_secs(broker.pid)}
                r["echo"] = self._closed_figures(summ, cpu0, cpu1, "echo")
                light_echo, _ = self.stress(broker, light, "echo-light")
                r["echo_light"] = self._latency(light_echo)
                self.procs.stop(echo)
                self.procs.stop(broker)
                # (b) the sim over HTTP at the same concurrency
                sim_cpu0 = cpu_secs(sim.pid)
                hb = self.selfbench(sim.url, c, s["ovh_http_secs"], 1.0, 16, "http")
                sim_cpu1 = cpu_secs(sim.pid)
                r["http"] = {
                    "throughput": hb["throughput"],
                    "p50": hb["latencyMs"]["p50"],
                    "p99": hb["latencyMs"]["p99"],
                    "requests": hb["requests"],
                    "errors": hb["errors"],
                    "sim_cpu_us_per_request_approx": 1e6 * (sim_cpu1 - sim_cpu0) / max(1, hb["requests"]),
                    "raw": hb,
                }
                # (c) the daemon
                broker = self.mosquitto()
                d = self.daemon(broker, sim, workers=c, queue=10000)
                self.stress(broker, warm, "daemon-warmup")
                cpu0 = {"daemon": cpu_secs(d.pid), "broker": cpu_secs(broker.pid), "sim": cpu_secs(sim.pid)}
                summ, _ = self.stress(broker, closed, "daemon")
                cpu1 = {"daemon": cpu_secs(d.pid), "broker": cpu_secs(broker.pid), "sim": cpu_secs(sim.pid)}
                r["daemon"] = self._closed_figures(summ, cpu0, cpu1, "daemon")
                r["daemon"]["mem_kib"] = mem_kib(d.pid)
                light_d, _ = self.stress(broker, light, "daemon-light")
                r["daemon_light"] = self._latency(light_d)
                self.procs.stop(d)
                self.procs.stop(broker)
                e, dd = r["echo"], r["daemon"]
                r["throughput_ratio_vs_echo"] = dd["throughput"] / e["throughput"]
                r["throughput_ratio_vs_http"] = dd["throughput"] / r["http"]["throughput"]
                r["added_p50_ms"] = dd["p50"] - e["p50"]
                r["added_p99_ms"] = dd["p99"] - e["p99"]
                r["light_added_p50_ms"] = r["daemon_light"]["p50"] - r["echo_light"]["p50"]
                r["light_added_p99_ms"] = r["daemon_light"]["p99"] - r["echo_light"]["p99"]
                reps.append(r)
                log(
                    f"  echo {e['throughput']:.0f} req/s p50 {e['p50']:.2f} p99 {e['p99']:.2f} | "
                    f"http {r['http']['throughput']:.0f} req/s p50 {r['http']['p50']:.2f} | "
                    f"daemon {dd['throughput']:.0f} req/s p50 {dd['p50']:.2f} p99 {dd['p99']:.2f}, "
                    f"{dd['cpu_us_per_request']:.1f} us CPU/request"
                )
        finally:
            self.procs.stop(sim)
        return {"settings": {k: v for k, v in s.items() if k.startswith("ovh_")}, "reps": reps}

    @staticmethod
    def _latency(summ):
        lat = summ["latencyMs"]
        return {
            "sent": summ["sent"],
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "throughput": summ["okThroughput"],
            "p50": lat["p50"],
            "p99": lat["p99"],
            "summary": summ,
        }

    def _closed_figures(self, summ, cpu0, cpu1, who):
        f = self._latency(summ)
        n = max(1, summ["sent"])
        f["cpu_secs"] = {k: cpu1[k] - cpu0[k] for k in cpu0}
        f["cpu_us_per_request"] = 1e6 * f["cpu_secs"][who] / n
        f["broker_cpu_us_per_request"] = 1e6 * f["cpu_secs"]["broker"] / n
        return f

    # ---------------------------------------------------------------------
    # 2. Saturation (also measures the sim's best throughput for 5)

    def saturated_sim(self):
        s = self.s
        return self.sim(
            "--max-num-seqs", s["sat_seqs"], "--output-tokens", f"fixed:{s['sat_tokens']}"
        )

    def sim_max(self, sim):
        s = self.s
        reps = []
        for rep in range(s["reps"]):
            by_c = {}
            for c in s["sat_sim_concurrencies"]:
                r = self.selfbench(
                    sim.url, c, s["sat_sim_secs"], s["sat_sim_warmup"], s["sat_tokens"], f"simmax-c{c}"
                )
                by_c[c] = r
            best = max(by_c, key=lambda c: by_c[c]["throughput"])
            reps.append(
                {
                    "by_concurrency": {
                        str(c): {"throughput": r["throughput"], "p50": r["latencyMs"]["p50"],
                                 "p99": r["latencyMs"]["p99"], "raw": r}
                        for c, r in by_c.items()
                    },
                    "best_concurrency": best,
                    "max_throughput": by_c[best]["throughput"],
                }
            )
            log(
                f"  sim max rep {rep + 1}: "
                + ", ".join(f"c{c} {r['throughput']:.2f}" for c, r in by_c.items())
                + " req/s"
            )
        return {
            "reps": reps,
            "max_throughput": median([r["max_throughput"] for r in reps]),
            # p99 at the sim's own batch size, as the latency baseline
            "p99_at_seqs": median(
                [r["by_concurrency"][str(s["sat_seqs"])]["p99"] for r in reps]
                if s["sat_seqs"] in s["sat_sim_concurrencies"] else []
            ),
        }

    def open_window(self, records, warm, secs):
        """ok replies completed in [warm, secs] s of the run: (rate, latencies)."""
        lo, hi = warm * 1000.0, secs * 1000.0
        lats = [
            lat for sent, lat, out in records
            if out == "ok" and lat is not None and lo <= sent + lat <= hi
        ]
        return len(lats) / (secs - warm), lats

    def saturation(self, sim, simmax):
        s = self.s
        cap = simmax["max_throughput"]
        rate = 2.0 * cap
        secs = s["sat_secs"]
        total = int(round(rate * secs))
        load = ["--rate", f"{rate:.3f}/s", "--duration", f"{secs}s", "--sessions", total + 10]
        # Baseline for the rejection latency: the echo floor at the same rate.
        broker = self.mosquitto()
        echo = self.echo(broker)
        eload = ["--rate", f"{rate:.3f}/s", "--duration", f"{s['sat_echo_secs']}s",
                 "--sessions", int(rate * s["sat_echo_secs"]) + 10]
        esumm, erecs = self.stress(broker, eload, "sat-echo")
        self.procs.stop(echo)
        self.procs.stop(broker)
        echo_p99 = pct([lat for _, lat, out in erecs if lat is not None], 99)
        reps = []
        for rep in range(s["reps"]):
            log(f"2 saturation: repetition {rep + 1}/{s['reps']} ({rate:.1f} req/s offered for {secs:.0f} s)")
            broker = self.mosquitto()
            d = self.daemon(broker, sim, workers=s["sat_workers"], queue=s["sat_queue"], max_sessions=total + 100)
            m0, c0 = metrics(d.metrics_port), cpu_secs(d.pid)
            summ, recs = self.stress(broker, load, "saturation")
            m1, c1 = metrics(d.metrics_port), cpu_secs(d.pid)
            self.procs.stop(d)
            self.procs.stop(broker)
            goodput, _ = self.open_window(recs, s["sat_warm"], secs)
            lats = [lat for _, lat, out in recs if out == "ok" and lat is not None]
            rejected = [lat for _, lat, out in recs if out == "overloaded" and lat is not None]
            errors = {k: v for k, v in summ["outcomes"].items() if k not in ("ok", "lost") and v}
            sent_at = [x[0] for x in recs]
            r = {
                "offered_rate": rate,
                "achieved_send_rate": (len(sent_at) - 1) / max(1e-9, (max(sent_at) - min(sent_at)) / 1000.0),
                "sent": summ["sent"],
                "ok": summ["outcomes"]["ok"],
                "errors": errors,
                "lost": summ["outcomes"]["lost"],
                "goodput": goodput,
                "goodput_ratio": goodput / cap,
                "ok_p50_ms": pct(lats, 50),
                "ok_p99_ms": pct(lats, 99),
                "rejections": len(rejected),
                "rejection_p50_ms": pct(rejected, 50),
                "rejection_p99_ms": pct(rejected, 99),
                "daemon_counted": requests_counted(m1) - requests_counted(m0),
                "daemon_cpu_us_per_request": 1e6 * (c1 - c0) / max(1, summ["sent"]),
                "summary": summ,
            }
            reps.append(r)
            log(
                f"  goodput {goodput:.2f} req/s ({r['goodput_ratio']:.3f} of {cap:.2f}), "
                f"{len(rejected)} rejected p99 {r['rejection_p99_ms']} ms, lost {r['lost']}"
            )
        return {
            "settings": {k: v for k, v in s.items() if k.startswith("sat_")},
            "sim_max": simmax,
            "echo_baseline": {"p50": pct([l for _, l, _ in erecs if l is not None], 50), "p99": echo_p99,
                               "summary": esumm},
            "reps": reps,
        }

    # ---------------------------------------------------------------------
    # 3. Burst

    def burst(self):
        s = self.s
        n = s["burst_requests"]
        load = ["--rate", f"{n}/s", "--duration", "1s", "--sessions", n]
        sim = self.sim(
            "--max-num-seqs", s["sat_seqs"], "--output-tokens", f"fixed:{s['burst_tokens']}"
        )
        reps = []
        try:
            for rep in range(s["burst_reps"]):
                log(f"3 burst: repetition {rep + 1}/{s['burst_reps']}")
                # baseline: the echo floor under the same burst
                broker = self.mosquitto()
                echo = self.echo(broker)
                ecpu0 = {"echo": cpu_secs(echo.pid), "broker": cpu_secs(broker.pid)}
                esumm, erecs = self.stress(broker, load, "burst-echo")
                ecpu1 = {"echo": cpu_secs(echo.pid), "broker": cpu_secs(broker.pid)}
                self.procs.stop(echo)
                self.procs.stop(broker)
                elats = [lat for _, lat, _ in erecs if lat is not None]
                # the daemon
                broker = self.mosquitto()
                d = self.daemon(broker, sim, workers=s["burst_workers"], queue=s["burst_queue"], max_sessions=n + 1000)
                self.stress(broker, ["--clients", s["burst_workers"], "--messages", 1, "--interval", "0s"], "burst-warmup")
                mem0 = mem_kib(d.pid)
                m0 = metrics(d.metrics_port)
                cpu0 = {"daemon": cpu_secs(d.pid), "broker": cpu_secs(broker.pid), "sim": cpu_secs(sim.pid)}
                summ, recs = self.stress(broker, load, "burst", reply_timeout="300s")
                cpu1 = {"daemon": cpu_secs(d.pid), "broker": cpu_secs(broker.pid), "sim": cpu_secs(sim.pid)}
                m1 = metrics(d.metrics_port)
                mem1 = mem_kib(d.pid)
                self.procs.stop(d)
                self.procs.stop(broker)
                sent_at = [x[0] for x in recs]
                overload = [lat for _, lat, out in recs if out == "overloaded" and lat is not None]
                errs = [lat for _, lat, out in recs if out not in ("ok", "lost") and lat is not None]
                counted = requests_counted(m1) - requests_counted(m0)
                r = {
                    "sent": summ["sent"],
                    "answered": summ["answered"],
                    "lost": summ["outcomes"]["lost"],
                    "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
                    "duplicates": summ["duplicates"],
                    "daemon_counted": counted,
                    "accounted": summ["answered"] == summ["sent"] == n and counted == n,
                    "send_span_ms": max(sent_at) - min(sent_at),
                    "achieved_send_rate": (len(sent_at) - 1) / max(1e-9, (max(sent_at) - min(sent_at)) / 1000.0),
                    "overload_replies": len(overload),
                    "overload_p50_ms": pct(overload, 50),
                    "overload_p99_ms": pct(overload, 99),
                    "error_p99_ms": pct(errs, 99),
                    "ok_p99_ms": pct([lat for _, lat, out in recs if out == "ok" and lat is not None], 99),
                    "elapsed_ms": summ["elapsedMs"],
                    "rss_before_kib": mem0["VmRSS"],
                    "rss_after_kib": mem1["VmRSS"],
                    "peak_rss_kib": mem1["VmHWM"],
                    # CPU seconds used during the burst and its drain
                    "cpu_secs": {k: cpu1[k] - cpu0[k] for k in cpu0},
                    "echo": {
                        "cpu_secs": {k: ecpu1[k] - ecpu0[k] for k in ecpu0},
                        "p50": pct(elats, 50),
                        "p99": pct(elats, 99),
                        "answered": esumm["answered"],
                        "send_span_ms": max(x[0] for x in erecs) - min(x[0] for x in erecs),
                        "summary": esumm,
                    },
                    "summary": summ,
                }
                r["overload_p99_ratio_vs_echo"] = (
                    r["overload_p99_ms"] / r["echo"]["p99"] if r["overload_p99_ms"] and r["echo"]["p99"] else None
                )
                reps.append(r)
                log(
                    f"  sent {r['sent']} in {r['send_span_ms']:.0f} ms, answered {r['answered']}, daemon counted "
                    f"{counted:.0f}; overloaded {len(overload)} p99 {r['overload_p99_ms']} ms "
                    f"(echo p99 {r['echo']['p99']} ms); peak RSS {mem1['VmHWM'] / 1024:.1f} MiB"
                )
        finally:
            self.procs.stop(sim)
        return {"settings": {k: v for k, v in s.items() if k.startswith("burst_")}, "reps": reps}

    # ---------------------------------------------------------------------
    # 4. Session scale

    def sessions(self):
        s = self.s
        n = s["sess_sessions"]
        rate = s["sess_rate"]
        msg = s["sess_message"]
        sim = self.sim("--latency-scale", "0", "--output-tokens", "text")
        reps = []
        warm_sessions = 64
        try:
            for rep in range(s["reps"]):
                log(f"4 sessions: repetition {rep + 1}/{s['reps']} ({n} sessions at {rate}/s)")
                broker = self.mosquitto()
                d = self.daemon(broker, sim, workers=8, queue=n, max_sessions=n + warm_sessions + 10)
                self.stress(broker, ["--clients", warm_sessions, "--messages", 5, "--interval", "0s"],
                            "sessions-warmup", message=msg)
                time.sleep(0.5)
                mem0 = mem_kib(d.pid)
                m0 = metrics(d.metrics_port)
                load = ["--rate", f"{rate}/s", "--duration", f"{n / rate:.3f}s", "--sessions", n]
                summ, recs = self.stress(broker, load, "sessions", message=msg, reply_timeout="300s")
                time.sleep(0.5)
                mem1 = mem_kib(d.pid)
                m1 = metrics(d.metrics_port)
                # One probe shows what the daemon keeps per turn: the user
                # message and the reply (the sim's "echo: <message>").
                probe = self._probe(broker, msg + " (#0)") if rep == 0 else None
                self.procs.stop(d)
                self.procs.stop(broker)
                # History text: "hi (#k)" and "echo: hi (#k)" for every k sent.
                history = [
                    2 * len(f"{msg} (#{k})") + len("echo: ") for k in range(summ["sent"])
                ]
                ok = summ["outcomes"]["ok"]
                delta_kib = mem1["VmRSS"] - mem0["VmRSS"]
                r = {
                    "sessions": n,
                    "sent": summ["sent"],
                    "ok": ok,
                    "lost": summ["outcomes"]["lost"],
                    "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
                    "sessions_gauge_before": m0.get("vllm_mqttd_sessions"),
                    "sessions_gauge_after": m1.get("vllm_mqttd_sessions"),
                    "rss_before_kib": mem0["VmRSS"],
                    "rss_after_kib": mem1["VmRSS"],
                    "hwm_after_kib": mem1["VmHWM"],
                    "rss_delta_kib": delta_kib,
                    "bytes_per_session": delta_kib * 1024.0 / max(1, ok),
                    "history_text_bytes_per_session": sum(history) / max(1, len(history)),
                    "ok_p99_ms": summ["latencyMs"]["p99"],
                    "probe": probe,
                    "summary": summ,
                }
                reps.append(r)
                log(
                    f"  RSS {mem0['VmRSS'] / 1024:.1f} -> {mem1['VmRSS'] / 1024:.1f} MiB for {ok} sessions: "
                    f"{r['bytes_per_session']:.0f} B/session (history text {r['history_text_bytes_per_session']:.1f} B)"
                )
        finally:
            self.procs.stop(sim)
        return {"settings": {k: v for k, v in s.items() if k.startswith("sess_")}, "reps": reps}

    def _probe(self, broker, message):
        try:
            out = subprocess.run(
                [str(BINS["chat"]), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
                 "-p", "general", "-s", f"probe-{self.run_tag}", "-m", message, "--json"],
                capture_output=True, text=True, timeout=30,
            )
            reply = json.loads(out.stdout)
            return {"message": message, "reply_text": reply.get("text")}
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return {"message": message, "error": str(e)}

    # ---------------------------------------------------------------------
    # 5. Worker sweep

    def sweep(self, sim, simmax):
        s = self.s
        cap = simmax["max_throughput"]
        rate = 2.0 * cap
        secs = s["sweep_secs"]
        total = int(round(rate * secs))
        load = ["--rate", f"{rate:.3f}/s", "--duration", f"{secs}s", "--sessions", total + 10]
        by_w = {w: [] for w in s["sweep_workers"]}
        for rep in range(s["reps"]):
            log(f"5 worker sweep: repetition {rep + 1}/{s['reps']} ({rate:.1f} req/s offered, {secs:.0f} s each)")
            for w in s["sweep_workers"]:
                broker = self.mosquitto()
                d = self.daemon(broker, sim, workers=w, queue=s["sweep_queue"], max_sessions=total + 100)
                summ, recs = self.stress(broker, load, f"sweep-w{w}")
                self.procs.stop(d)
                self.procs.stop(broker)
                # Goodput in the steady window; latency over every ok reply,
                # the drain at the end included (with few workers the queue
                # wait grows through the run).
                goodput, _ = self.open_window(recs, s["sweep_warm"], secs)
                lats = [lat for _, lat, out in recs if out == "ok" and lat is not None]
                r = {
                    "workers": w,
                    "goodput": goodput,
                    "goodput_ratio": goodput / cap,
                    "ok_p50_ms": pct(lats, 50),
                    "ok_p99_ms": pct(lats, 99),
                    "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
                    "lost": summ["outcomes"]["lost"],
                    "summary": summ,
                }
                by_w[w].append(r)
                log(f"  workers {w:>2}: goodput {goodput:.2f} req/s ({r['goodput_ratio']:.3f}), p99 {r['ok_p99_ms']} ms")
        return {
            "settings": {k: v for k, v in s.items() if k.startswith("sweep_")},
            "offered_rate": rate,
            "sim_max": cap,
            "sim_p99_at_seqs": simmax.get("p99_at_seqs"),
            "by_workers": {str(w): v for w, v in by_w.items()},
        }


    # ---------------------------------------------------------------------
    # Helpers of 6-8

    def warm_prefix(self, sim, system_prompt):
        """One request with the project's system prompt, so that each sim has
        it cached before the run (as any vLLM has after its first request)."""
        body = json.dumps({
            "model": "sim-model",
            "messages": [{"role": "system", "content": system_prompt},
                         {"role": "user", "content": "warm-up"}],
            "max_tokens": 1,
        }).encode()
        req = urllib.request.Request(sim.url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    @staticmethod
    def sim_load(m):
        """A sim's counters of interest from one /metrics read."""
        return {
            "queries": msum(m, "vllm:prefix_cache_queries_total"),
            "hits": msum(m, "vllm:prefix_cache_hits_total"),
            "requests": msum(m, "vllm:request_success_total"),
            "ttft": hist(m, "vllm:time_to_first_token_seconds"),
            "ttft_sum": msum(m, "vllm:time_to_first_token_seconds_sum"),
            "ttft_count": msum(m, "vllm:time_to_first_token_seconds_count"),
        }

    # ---------------------------------------------------------------------
    # 6. Routing: affinity vs round-robin vs least-loaded

    def routing_setup(self):
        s = self.s
        sp = project_system_prompt(s["rt_system_tokens"])
        msg = ("Please check shelf 12 in aisle 4 and tell me whether the robot can pick "
               "the blue boxes before noon, then plan its route back to the charging dock "
               "avoiding the loading bay.")
        for k in ("rt_sessions", "rt_sat_sessions"):  # see settings()
            if s[k] % s["rt_sims"] == 0:
                s[k] += 1
        turns = max(1, round(s["rt_rate"] * s["rt_secs"] / s["rt_sessions"]))
        # The sim's view of one session's last prompt, to size its cache:
        # system prompt, then (user, assistant) per earlier turn.
        block = 16 * SIM_BYTES_PER_TOKEN
        n = s["rt_sessions"] * turns  # request numbers run this high
        turn_bytes = [len(chatml("user", f"{msg} (#{n})")) + len(chatml("assistant", sim_reply(f"{msg} (#{n})", s["rt_tokens"])))
                      for _ in range(turns)]
        sys_blocks = len(chatml("system", sp)) // block
        session_blocks = math.ceil(sum(turn_bytes) / block)  # its history at the end, reply included
        per_sim = s["rt_sessions"] / s["rt_sims"]
        cache = int(sys_blocks + s["rt_cache_factor"] * per_sim * session_blocks)
        conf = self.workdir / "routing.toml"
        conf.write_text(
            'projects = ["general"]\n'
            "[project_defaults]\n"
            f"system_prompt = {json.dumps(sp)}\n"
            f"max_tokens = {s['rt_tokens']}\n"
            'format = "json"\n'
            "[sessions]\n"
            "history_messages = 64\n"
            "history_token_budget = 32000\n"
        )
        # The sim's own model: a request at a full batch holds its slot for
        # about ttft + tokens x (7 + 0.5 x seqs) ms (uncached prompt aside).
        req_secs = (s["rt_ttft_ms"] + s["rt_tokens"] * (7.0 + 0.5 * s["rt_seqs"])) / 1000.0
        capacity = s["rt_sims"] * s["rt_seqs"] / req_secs
        # Phase 2 runs on fresh sims whose cache is sized the same way for
        # its own sessions: about 1 / rt_sat_factor of its requests are
        # answered ok (the rest overloaded), and only those extend a history.
        sat_turns = s["rt_sat_secs"] * capacity / s["rt_sat_sessions"]
        sat_blocks = math.ceil(sat_turns * turn_bytes[0] / block)
        sat_cache = int(sys_blocks + s["rt_cache_factor"] * s["rt_sat_sessions"] / s["rt_sims"] * sat_blocks)
        return {
            "system_prompt": sp,
            "system_prompt_tokens": len(chatml("system", sp)) // SIM_BYTES_PER_TOKEN,
            "message": msg,
            "config": conf,
            "turns": turns,
            "sys_blocks": sys_blocks,
            "session_history_blocks": session_blocks,
            "last_prompt_tokens": (len(chatml("system", sp)) + sum(turn_bytes[:-1]) + len(chatml("user", msg)) + 32) // SIM_BYTES_PER_TOKEN,
            "cache_blocks": cache,
            "cache_blocks_all_sessions": sys_blocks + s["rt_sessions"] * session_blocks,
            "pool_capacity_modelled": capacity,
            "sat_ok_turns": sat_turns,
            "sat_cache_blocks": sat_cache,
            "sat_cache_blocks_all_sessions": sys_blocks + s["rt_sat_sessions"] * sat_blocks,
        }

    def routing(self):
        s = self.s
        st = self.routing_setup()
        sim_args = [
            "--max-num-seqs", s["rt_seqs"],
            "--output-tokens", f"fixed:{s['rt_tokens']}",
            "--ttft-ms", s["rt_ttft_ms"],
            "--ttft-per-token-ms", s["rt_ttft_per_token_ms"],
            "--prefix-cache-blocks", st["cache_blocks"],
            "--max-model-len", 32768,
        ]
        log(f"6 routing: {s['rt_sims']} sims, system prompt {st['system_prompt_tokens']} tokens, "
            f"{s['rt_sessions']} sessions x {st['turns']} turns at {fmt(s['rt_rate'])} req/s "
            f"(last prompt ~{st['last_prompt_tokens']} tokens); prefix cache {st['cache_blocks']} blocks per sim "
            f"(all sessions' would need {st['cache_blocks_all_sessions']}); then "
            f"{fmt(s['rt_sat_factor'] * st['pool_capacity_modelled'])} req/s over {s['rt_sat_sessions']} sessions "
            f"for the throughput, prefix cache {st['sat_cache_blocks']} blocks per sim "
            f"(all sessions' would need {st['sat_cache_blocks_all_sessions']})")
        reps = []
        pols = s["rt_policies"]
        for rep in range(s["reps"]):
            r = {}
            # Rotate the order so that no policy always runs first.
            for pol in pols[rep % len(pols):] + pols[:rep % len(pols)]:
                r[pol] = self.routing_run(pol, sim_args, st)
                x = r[pol]
                log(f"  rep {rep + 1} {pol:>12}: TTFT p50 {fmt(x['ttft_p50_ms'])} p99 {fmt(x['ttft_p99_ms'])} ms, "
                    f"hit rate {x['hit_rate']:.3f}, reply p50 {fmt(x['reply_p50_ms'])} ms, per sim {x['per_sim_requests']}, "
                    f"not ok {x['not_ok']}; saturated goodput {fmt(x['sat_goodput'])} req/s")
            base = r["round-robin"]

            def ratio(a, b):
                return a / b if a is not None and b else None

            for pol in pols:
                if pol == "round-robin":
                    continue
                x = r[pol]
                x["vs_rr"] = {
                    "ttft_p50": ratio(x["ttft_p50_ms"], base["ttft_p50_ms"]),
                    "ttft_p99": ratio(x["ttft_p99_ms"], base["ttft_p99_ms"]),
                    "ttft_mean": ratio(x["ttft_mean_ms"], base["ttft_mean_ms"]),
                    "throughput": ratio(x["sat_goodput"], base["sat_goodput"]),
                    "reply_p50": ratio(x["reply_p50_ms"], base["reply_p50_ms"]),
                }
            reps.append(r)
        setup = {k: v for k, v in st.items() if k not in ("system_prompt", "config")}
        return {"settings": {k: v for k, v in s.items() if k.startswith("rt_")}, "setup": setup,
                "sim_args": [str(a) for a in sim_args], "reps": reps}

    def routing_run(self, pol, sim_args, st):
        s = self.s
        sims = []
        broker = d = None
        sat_rate = s["rt_sat_factor"] * st["pool_capacity_modelled"]
        sat_total = int(round(sat_rate * s["rt_sat_secs"]))
        try:
            for _ in range(s["rt_sims"]):
                sims.append(self.sim(*sim_args))
            for sim in sims:
                self.warm_prefix(sim, st["system_prompt"])
            broker = self.mosquitto()
            # Phase 1: TTFT and cache hits below capacity.
            d = self.daemon(broker, sims, workers=s["rt_workers"], queue=1000,
                            extra=["--routing", pol], config=st["config"])
            m0 = [self.sim_load(metrics(x.port)) for x in sims]
            load = ["--rate", f"{s['rt_rate']}/s", "--duration", f"{s['rt_secs']}s", "--sessions", s["rt_sessions"]]
            summ, recs = self.stress(broker, load, f"routing-{pol}", message=st["message"])
            m1 = [self.sim_load(metrics(x.port)) for x in sims]
            self.procs.stop(d)
            d = None
            for x in sims:
                self.procs.stop(x)
            # Phase 2: goodput at saturation, --num-workers auto, fresh sims.
            cache_at = sim_args.index("--prefix-cache-blocks") + 1
            sim_args2 = sim_args[:cache_at] + [st["sat_cache_blocks"]] + sim_args[cache_at + 1:]
            sims = [self.sim(*sim_args2) for _ in range(s["rt_sims"])]
            for sim in sims:
                self.warm_prefix(sim, st["system_prompt"])
            m1b = [self.sim_load(metrics(x.port)) for x in sims]
            d = self.daemon(broker, sims, workers="auto", queue=s["rt_sat_queue"], max_sessions=10000,
                            extra=["--routing", pol], config=st["config"])
            load = ["--rate", f"{sat_rate:.3f}/s", "--duration", f"{s['rt_sat_secs']}s",
                    "--sessions", s["rt_sat_sessions"]]
            ssumm, srecs = self.stress(broker, load, f"routing-sat-{pol}", message=st["message"])
            m2 = [self.sim_load(metrics(x.port)) for x in sims]
        finally:
            for x in (d, broker, *sims):
                if x is not None:
                    self.procs.stop(x)
        ttft = {}
        for a, b in zip(m0, m1):
            ttft = hist_add(ttft, hist_add(b["ttft"], a["ttft"], -1.0))
        q = sum(b["queries"] - a["queries"] for a, b in zip(m0, m1))
        h = sum(b["hits"] - a["hits"] for a, b in zip(m0, m1))
        ttft2 = {}
        for a, b in zip(m1b, m2):
            ttft2 = hist_add(ttft2, hist_add(b["ttft"], a["ttft"], -1.0))
        sat_p50 = hist_quantile(0.5, ttft2)
        q2 = sum(b["queries"] - a["queries"] for a, b in zip(m1b, m2))
        h2 = sum(b["hits"] - a["hits"] for a, b in zip(m1b, m2))
        oks = [lat for _, lat, out in recs if out == "ok" and lat is not None]
        p50, p99 = hist_quantile(0.5, ttft), hist_quantile(0.99, ttft)
        tsum = sum(b["ttft_sum"] - a["ttft_sum"] for a, b in zip(m0, m1))
        tcount = sum(b["ttft_count"] - a["ttft_count"] for a, b in zip(m0, m1))
        goodput, _ = self.open_window(srecs, s["rt_sat_warm"], s["rt_sat_secs"])
        return {
            "policy": pol,
            "sent": summ["sent"],
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "not_ok": summ["sent"] - summ["outcomes"]["ok"],
            "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
            "throughput": summ["okThroughput"],
            "ttft_p50_ms": p50 * 1000.0 if p50 is not None else None,
            "ttft_p99_ms": p99 * 1000.0 if p99 is not None else None,
            "ttft_buckets": {("+Inf" if k == math.inf else k): v for k, v in sorted(ttft.items())},
            # exact, from the histograms' _sum / _count
            "ttft_mean_ms": 1000.0 * tsum / tcount if tcount else None,
            "prefix_queries": q,
            "prefix_hits": h,
            "hit_rate": h / q if q else None,
            "per_sim_requests": [int(b["requests"] - a["requests"]) for a, b in zip(m0, m1)],
            "reply_p50_ms": pct(oks, 50),
            "reply_p99_ms": pct(oks, 99),
            "summary": summ,
            "sat_offered_rate": sat_rate,
            "sat_goodput": goodput,
            "sat_sent": ssumm["sent"],
            "sat_lost": ssumm["outcomes"]["lost"],
            "sat_outcomes": {k: v for k, v in ssumm["outcomes"].items() if v},
            "sat_hit_rate": h2 / q2 if q2 else None,
            "sat_ttft_p50_ms": sat_p50 * 1000.0 if sat_p50 is not None else None,
            "sat_per_sim_requests": [int(b["requests"] - a["requests"]) for a, b in zip(m1b, m2)],
            "sat_summary": ssumm,
        }

    # ---------------------------------------------------------------------
    # 7. --num-workers auto vs a fixed 8, against batches of 8, 32 and 128

    def auto(self):
        s = self.s
        tokens = s["auto_tokens"]
        reps = max(1, min(s["reps"], s["auto_reps"])) if not self.args.reps else s["reps"]
        out = {}
        for seqs in s["auto_seqs"]:
            # The sim's own model (sim/src/config.rs defaults): a request at a
            # full batch lasts about ttft + tokens x (7 + 0.5 x seqs) ms.
            req_secs = 0.02 + tokens * (0.007 + 0.0005 * seqs)
            sim = self.sim("--max-num-seqs", seqs, "--output-tokens", f"uniform:{tokens // 2}-{tokens * 3 // 2}")
            runs = {"sim_max": [], "auto": [], "fixed": []}
            try:
                for rep in range(reps):
                    by_c = {}
                    for c in [k * seqs for k in s["auto_max_at"]]:
                        # max_tokens at the top of the range: the sim cuts its
                        # uniform length at max_tokens (the daemon asks for 512)
                        by_c[c] = self.selfbench(sim.url, c, max(10.0, 3.0 * req_secs), max(2.0, 1.5 * req_secs),
                                                 tokens * 3 // 2, f"automax-s{seqs}-c{c}")
                    best = max(by_c, key=lambda c: by_c[c]["throughput"])
                    cap = by_c[best]["throughput"]
                    runs["sim_max"].append({
                        "by_concurrency": {str(c): {"throughput": x["throughput"], "p50": x["latencyMs"]["p50"],
                                                    "p99": x["latencyMs"]["p99"]} for c, x in by_c.items()},
                        "best_concurrency": best, "max_throughput": cap,
                    })
                    log(f"7 auto: max-num-seqs {seqs}, rep {rep + 1}/{reps}: sim max {cap:.2f} req/s "
                        f"(" + ", ".join(f"c{c} {x['throughput']:.2f}" for c, x in by_c.items()) + ")")
                    for mode in ("auto", s["auto_fixed"]) if s["auto_with_fixed"] else ("auto",):
                        r = self.auto_run(sim, seqs, mode, cap, req_secs)
                        runs["auto" if mode == "auto" else "fixed"].append(r)
                        log(f"  workers {mode}: goodput {r['goodput']:.2f} req/s ({r['goodput_ratio']:.3f}), "
                            f"sim waiting mean {r['sim_waiting_mean']:.2f} max {r['sim_waiting_max']:.0f}, "
                            f"running mean {r['sim_running_mean']:.1f}, daemon limit {r['limit_last']}, "
                            f"lost {r['lost']}")
            finally:
                self.procs.stop(sim)
            out[str(seqs)] = runs
        return {"settings": {k: v for k, v in s.items() if k.startswith("auto_")}, "reps": reps, "by_seqs": out}

    def auto_run(self, sim, seqs, mode, cap, req_secs):
        s = self.s
        warm = s["auto_warm"] + 1.5 * req_secs
        secs = warm + s["auto_window"]
        rate = 2.0 * cap
        total = int(round(rate * secs))
        load = ["--rate", f"{rate:.3f}/s", "--duration", f"{secs:.1f}s", "--sessions", total + 10]
        broker = self.mosquitto()
        d = None
        try:
            d = self.daemon(broker, sim, workers=mode, queue=s["auto_queue"], max_sessions=total + 100)
            sampler = Sampler([sim.port, d.metrics_port])
            sampler.start()
            t_start = time.monotonic()
            try:
                summ, recs = self.stress(broker, load, f"auto-s{seqs}-w{mode}")
            finally:
                sampler.stop()
        finally:
            for x in (d, broker):
                if x is not None:
                    self.procs.stop(x)
        goodput, _ = self.open_window(recs, warm, secs)
        w0, w1 = t_start + warm, t_start + secs
        waiting = sampler.series(0, "vllm:num_requests_waiting", w0, w1)
        waiting_run = sampler.series(0, "vllm:num_requests_waiting", t_start, w1)
        running = sampler.series(0, "vllm:num_requests_running", w0, w1)
        limit_all = [(round(t - t_start, 2), msum(row[1], "vllm_mqttd_backend_concurrency_limit"))
                     for t, row in sampler.samples if row[1] is not None]
        limit_win = [v for t, v in limit_all if warm <= t <= secs]
        # When the limit first reached the batch size (auto's ramp).
        reached = next((max(0.0, t) for t, v in limit_all if v >= seqs), None)
        lats = [lat for _, lat, out in recs if out == "ok" and lat is not None]
        return {
            "workers": mode,
            "offered_rate": rate,
            "warm_secs": warm,
            "secs": secs,
            "sent": summ["sent"],
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
            "goodput": goodput,
            "goodput_ratio": goodput / cap,
            "sim_max": cap,
            "sim_waiting_mean": statistics.fmean(waiting) if waiting else 0.0,
            "sim_waiting_p95": pct(waiting, 95) or 0.0,
            "sim_waiting_max": max(waiting) if waiting else 0.0,
            "sim_waiting_samples": len(waiting),
            # the whole run, auto's ramp included
            "sim_waiting_mean_run": statistics.fmean(waiting_run) if waiting_run else 0.0,
            "sim_waiting_max_run": max(waiting_run) if waiting_run else 0.0,
            "sim_running_mean": statistics.fmean(running) if running else 0.0,
            "limit_window_min": min(limit_win) if limit_win else None,
            "limit_window_max": max(limit_win) if limit_win else None,
            "limit_last": limit_all[-1][1] if limit_all else None,
            "limit_reached_batch_at_secs": reached,
            "limit_trace": limit_all[::4],
            "ok_p50_ms": pct(lats, 50),
            "ok_p99_ms": pct(lats, 99),
            "summary": summ,
        }

    # ---------------------------------------------------------------------
    # 8. Failover: one of 3 backends SIGKILLed mid-load

    def failover(self):
        s = self.s
        reps = []
        for rep in range(s["reps"]):
            log(f"8 failover: repetition {rep + 1}/{s['reps']} ({s['fo_rate']:.0f} req/s for {s['fo_secs']:.0f} s, "
                f"one of {s['fo_sims']} sims SIGKILLed at {s['fo_kill_at']:.0f} s)")
            r = self.failover_run(rep)
            reps.append(r)
            log(f"  sent {r['sent']}, ok {r['ok']}, errors {r['errors']}, lost {r['lost']}; "
                f"{r['victim_in_flight']} in flight on the killed sim; daemon retries {r['daemon_retries']:.0f}; "
                f"ok p99 before / after the kill {fmt(r['ok_p99_before_ms'])} / {fmt(r['ok_p99_after_ms'])} ms")
        return {"settings": {k: v for k, v in s.items() if k.startswith("fo_")}, "reps": reps}

    def failover_run(self, rep):
        s = self.s
        sims, broker, d = [], None, None
        total = int(round(s["fo_rate"] * s["fo_secs"]))
        load = ["--rate", f"{s['fo_rate']}/s", "--duration", f"{s['fo_secs']}s", "--sessions", s["fo_sessions"]]
        killed = {}
        try:
            for _ in range(s["fo_sims"]):
                sims.append(self.sim("--max-num-seqs", s["fo_seqs"], "--output-tokens", f"fixed:{s['fo_tokens']}"))
            victim = sims[rep % len(sims)]
            broker = self.mosquitto()
            d = self.daemon(broker, sims, workers="auto", queue=1000, max_sessions=total + 100)
            m0 = metrics(d.metrics_port)

            def kill():
                try:
                    vm = metrics(victim.port)
                    killed["in_flight"] = msum(vm, "vllm:num_requests_running") + msum(vm, "vllm:num_requests_waiting")
                    killed["served_before"] = msum(vm, "vllm:request_success_total")
                except (OSError, ValueError):
                    killed["in_flight"] = None
                killed["t"] = time.monotonic()
                os.killpg(victim.pid, signal.SIGKILL)

            t_start = time.monotonic()
            timer = threading.Timer(s["fo_kill_at"], kill)
            timer.start()
            try:
                summ, recs = self.stress(broker, load, "failover")
            finally:
                timer.cancel()
            m1 = metrics(d.metrics_port)
        finally:
            for x in (d, broker, *sims):
                if x is not None:
                    self.procs.stop(x)
        kill_ms = (killed["t"] - t_start) * 1000.0 if "t" in killed else None
        errors = {k: v for k, v in summ["outcomes"].items() if k not in ("ok", "lost") and v}
        before = [lat for sent, lat, out in recs if out == "ok" and lat is not None and kill_ms and sent + lat < kill_ms]
        after = [lat for sent, lat, out in recs if out == "ok" and lat is not None and kill_ms and sent > kill_ms]
        # Sent before the kill and answered after it. vllm-stress's clock
        # starts once its connections are up, a few tens of ms after
        # t_start: the window allows 100 ms of that.
        spanning = [out for sent, lat, out in recs
                    if kill_ms and sent <= kill_ms and (lat is None or sent + lat >= kill_ms - 100.0)]
        circuits = {label(k, "backend"): v for k, v in m1.items() if k.startswith("vllm_mqttd_backend_circuit_state")}
        return {
            "sent": summ["sent"],
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "errors": sum(errors.values()),
            "error_outcomes": errors,
            "victim": victim.url,
            "kill_at_ms": kill_ms,
            "victim_in_flight": killed.get("in_flight"),
            "victim_served_before": killed.get("served_before"),
            "spanning_kill": len(spanning),
            "spanning_kill_not_ok": sum(1 for out in spanning if out != "ok"),
            "ok_p50_ms": summ["latencyMs"]["p50"],
            "ok_p99_before_ms": pct(before, 99),
            "ok_p99_after_ms": pct(after, 99),
            "daemon_retries": msum(m1, "vllm_mqttd_backend_retries_total") - msum(m0, "vllm_mqttd_backend_retries_total"),
            "daemon_counted": requests_counted(m1) - requests_counted(m0),
            "circuit_state_after": circuits,
            "summary": summ,
        }

    # ---------------------------------------------------------------------
    # Helpers of 9-10: Redis, whole-machine CPU

    def redis(self):
        """A Redis on a free loopback port, without persistence."""
        port = free_port()
        p = self.procs.start(
            self.name("redis"),
            [REDIS_SERVER, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir],
        )
        wait_for("redis-server", lambda: redis_cli(port, "ping") == "PONG", proc=p)
        p.port = port
        p.url = f"redis://127.0.0.1:{port}"
        return p

    def snapshot(self, procs, red=None):
        """CPU seconds of `procs` ({name: proc or [procs]}), the machine's
        /proc/stat, and Redis's command counts, at one moment."""
        cpu = {}
        for k, p in procs.items():
            cpu[k] = sum(cpu_secs(x.pid) for x in p) if isinstance(p, (list, tuple)) else cpu_secs(p.pid)
        # The daemon's own count of its store round trips (every call to
        # Redis is one; Redis's INFO cannot tell a script's LRANGE from a
        # client's).
        d = procs.get("daemon") or procs.get("daemons")
        store_calls = None
        if red is not None and d is not None:
            ds = d if isinstance(d, (list, tuple)) else [d]
            store_calls = sum(msum(metrics(x.metrics_port), "vllm_mqttd_store_calls_total") for x in ds)
        return {"t": time.monotonic(), "cpu": cpu, "stat": proc_stat(),
                "redis": redis_stats(red.port) if red is not None else None,
                "store_calls": store_calls}

    @staticmethod
    def cpu_split(a, b, client_cpu):
        """CPU seconds of each part between snapshots a and b; the whole
        machine's busy CPU and what none of ours used (other users)."""
        wall = b["t"] - a["t"]
        ours = {k: b["cpu"][k] - a["cpu"][k] for k in a["cpu"]}
        ours["stress client"] = client_cpu
        st = {k: (b["stat"][k] - a["stat"][k]) / CLK_TCK for k in a["stat"]}
        busy = st["busy"]
        return {
            "wall_secs": wall,
            "cpu_secs": ours,
            "ours_secs": sum(ours.values()),
            "machine_busy_secs": busy,
            "machine_idle_secs": st["idle"],
            "machine_steal_secs": st["steal"],
            "others_secs": max(0.0, busy - sum(ours.values())),
            "machine_busy_fraction": busy / max(1e-9, busy + st["idle"] + st["steal"]),
        }

    @staticmethod
    def store_ops(r0, r1, answered, calls0=None, calls1=None):
        """Redis's work between two INFO reads, per request answered: round
        trips (the daemon's vllm_mqttd_store_calls_total when given, else
        EVALSHA + EVAL + LRANGE, which also counts a script's own LRANGE)
        and commands (script bodies' included)."""
        if r0 is None or r1 is None:
            return None
        d = {k: r1["calls"].get(k, 0) - r0["calls"].get(k, 0) for k in set(r0["calls"]) | set(r1["calls"])}
        d = {k: v for k, v in d.items() if v}
        trips = sum(d.get(k, 0) for k in ("evalsha", "eval", "lrange", "script|load"))
        if calls0 is not None and calls1 is not None:
            trips = calls1 - calls0
        ours = {"info", "config|resetstat", "flushall", "ping"}  # the bench's own
        commands = sum(v for k, v in d.items() if k not in ours)
        n = max(1, answered)
        return {
            "calls": d,
            "round_trips": trips,
            "round_trips_per_request": trips / n,
            "commands_per_request": commands / n,
            "total_commands_processed_per_request":
                (r1["total_commands_processed"] - r0["total_commands_processed"] - 1) / n,
        }

    # ---------------------------------------------------------------------
    # 9. The shared store's cost: one daemon, --state-url memory vs redis

    def store_cost(self):
        s = self.s
        sim = self.sim("--latency-scale", "0", "--output-tokens", "text")
        red = self.redis()
        closed = ["--clients", s["sc_clients"], "--messages", s["sc_messages"], "--interval", "0s"]
        warm = ["--clients", s["sc_clients"], "--messages", s["sc_warmup_messages"], "--interval", "0s"]
        stores = {"memory": "memory", "redis": red.url}
        try:
            # The rate: a fraction of what one daemon and the sim do closed
            # loop, with either store (the lower), measured now.
            calib = {}
            for store in ("memory", "redis"):
                calib[store] = self.store_run(sim, red, store, stores[store], warm, closed, None, "calib")["closed"]
            sat = min(c["throughput"] for c in calib.values())
            rate = s["sc_rate"] or max(100, int(round(s["sc_rate_fraction"] * sat, -1)))
            log(f"9 store cost: closed loop {fmt(calib['memory']['throughput'])} req/s with memory, "
                f"{fmt(calib['redis']['throughput'])} with redis: open loop at {rate} req/s")
            opn = ["--rate", f"{rate}/s", "--duration", f"{s['sc_secs']}s", "--sessions", s["sc_sessions"]]
            reps = []
            for rep in range(s["reps"]):
                log(f"9 store cost: repetition {rep + 1}/{s['reps']} ({rate} req/s open loop for {fmt(s['sc_secs'], 0)} s)")
                order = ("memory", "redis") if rep % 2 == 0 else ("redis", "memory")
                r = {"order": list(order)}
                for store in order:
                    r[store] = self.store_run(sim, red, store, stores[store], warm, closed, opn, store)
                m, x = r["memory"]["open"], r["redis"]["open"]
                r["added_p50_ms"] = x["p50"] - m["p50"]
                r["added_p99_ms"] = x["p99"] - m["p99"]
                r["cpu_ratio"] = x["daemon_cpu_us_per_request"] / max(1e-9, m["daemon_cpu_us_per_request"])
                r["closed_throughput_ratio"] = r["redis"]["closed"]["throughput"] / r["memory"]["closed"]["throughput"]
                reps.append(r)
                log(f"  memory p50 {fmt(m['p50'])} p99 {fmt(m['p99'])} ms, {fmt(m['daemon_cpu_us_per_request'])} us CPU | "
                    f"redis p50 {fmt(x['p50'])} p99 {fmt(x['p99'])} ms, {fmt(x['daemon_cpu_us_per_request'])} us CPU, "
                    f"{fmt(x['store']['round_trips_per_request'])} round trips/request | added p50 "
                    f"{fmt(r['added_p50_ms'])} p99 {fmt(r['added_p99_ms'])} ms; lost {m['lost']} / {x['lost']}")
        finally:
            self.procs.stop(red)
            self.procs.stop(sim)
        return {"settings": {k: v for k, v in s.items() if k.startswith("sc_")}, "rate": rate,
                "calibration": calib, "reps": reps}

    def store_run(self, sim, red, store, url, warm, closed, opn, tag):
        """One daemon with this store: warm-up, the closed loop (its
        saturated throughput), then the open loop if `opn`."""
        s = self.s
        broker = self.mosquitto()
        redis_cli(red.port, "flushall")
        d = None
        out = {"store": store, "loadavg": loadavg()}
        try:
            d = self.daemon(broker, sim, workers=s["sc_workers"], queue=100000,
                            max_sessions=s["sc_sessions"] + 4 * s["sc_clients"] + 100,
                            extra=["--state-url", url])
            self.stress(broker, warm, f"store-{tag}-warmup")
            parts = {"daemon": d, "broker": broker, "sim": sim, "redis": red}
            a = self.snapshot(parts, red)
            summ, _ = self.stress(broker, closed, f"store-{tag}-closed")
            b = self.snapshot(parts, red)
            n = max(1, summ["answered"])
            out["closed"] = {
                "throughput": summ["okThroughput"], "sent": summ["sent"], "answered": summ["answered"],
                "ok": summ["outcomes"]["ok"], "lost": summ["outcomes"]["lost"],
                "p50": summ["latencyMs"]["p50"], "p99": summ["latencyMs"]["p99"],
                "daemon_cpu_us_per_request": 1e6 * (b["cpu"]["daemon"] - a["cpu"]["daemon"]) / n,
                "cpu": self.cpu_split(a, b, summ["client_cpu_secs"]),
                "store": self.store_ops(a["redis"], b["redis"], n, a["store_calls"], b["store_calls"])
                if store == "redis" else None,
            }
            if opn:
                a = self.snapshot(parts, red)
                summ, recs = self.stress(broker, opn, f"store-{tag}-open")
                b = self.snapshot(parts, red)
                n = max(1, summ["answered"])
                lats = [lat for _, lat, o in recs if o == "ok" and lat is not None]
                sent_at = [x[0] for x in recs]
                cpu = {k: b["cpu"][k] - a["cpu"][k] for k in a["cpu"]}
                out["open"] = {
                    "sent": summ["sent"], "answered": summ["answered"], "ok": summ["outcomes"]["ok"],
                    "lost": summ["outcomes"]["lost"],
                    "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
                    "achieved_send_rate": (len(sent_at) - 1) / max(1e-9, (max(sent_at) - min(sent_at)) / 1000.0),
                    "p50": pct(lats, 50), "p90": pct(lats, 90), "p99": pct(lats, 99),
                    "daemon_cpu_us_per_request": 1e6 * cpu["daemon"] / n,
                    "redis_cpu_us_per_request": 1e6 * cpu["redis"] / n,
                    "broker_cpu_us_per_request": 1e6 * cpu["broker"] / n,
                    "cpu": self.cpu_split(a, b, summ["client_cpu_secs"]),
                    "store": self.store_ops(a["redis"], b["redis"], n, a["store_calls"], b["store_calls"])
                    if store == "redis" else None,
                    "summary": summ,
                }
                m = metrics(d.metrics_port)
                out["open"]["daemon_requests_total"] = requests_counted(m)
        finally:
            for x in (d, broker):
                if x is not None:
                    self.procs.stop(x)
        return out

    # ---------------------------------------------------------------------
    # 10. Throughput with 1, 2 and 4 instances: one broker, one share
    #     group, one Redis, a sim with spare capacity

    def instances(self):
        s = self.s
        # Zero latency: the sim answers at once and serves tens of
        # thousands of requests per second on one core (selfbench), far
        # more than the daemons ask of it.
        sim = self.sim("--latency-scale", "0", "--output-tokens", "text", "--max-num-seqs", 1024)
        red = self.redis()
        counts = s["inst_counts"]
        reps = []
        try:
            for rep in range(s["reps"]):
                log(f"10 instances: repetition {rep + 1}/{s['reps']} ({s['inst_clients']} closed-loop sessions x "
                    f"{s['inst_messages']} requests per instance count)")
                r = {}
                # Rotate the order so that no count always runs first.
                k = rep % len(counts)
                for n in counts[k:] + counts[:k]:
                    r[str(n)] = x = self.instances_run(sim, red, n, rep)
                    c = x["cpu"]["cpu_secs"]
                    log(f"  {n} instance(s): {fmt(x['throughput'])} req/s, sent {x['sent']} answered {x['answered']} "
                        f"ok {x['ok']} lost {x['lost']}; per instance {x['per_instance']}; CPU s: daemons "
                        f"{fmt(c['daemons'])} broker {fmt(c['broker'])} redis {fmt(c['redis'])} sim {fmt(c['sim'])} "
                        f"client {fmt(c['stress client'])} others {fmt(x['cpu']['others_secs'])} in "
                        f"{fmt(x['cpu']['wall_secs'])} s (machine busy {fmt(x['cpu']['machine_busy_fraction'], 3)})")
                base = r[str(counts[0])]["throughput"]
                for n in counts:
                    r[str(n)]["ratio_vs_1"] = r[str(n)]["throughput"] / base if base else None
                reps.append(r)
        finally:
            self.procs.stop(red)
            self.procs.stop(sim)
        return {"settings": {k: v for k, v in s.items() if k.startswith("inst_")}, "reps": reps}

    def instances_run(self, sim, red, n, rep):
        s = self.s
        closed = ["--clients", s["inst_clients"], "--messages", s["inst_messages"], "--interval", "0s"]
        warm = ["--clients", s["inst_clients"], "--messages", s["inst_warmup_messages"], "--interval", "0s"]
        broker = self.mosquitto()
        redis_cli(red.port, "flushall")
        ds = []
        try:
            for _ in range(n):
                ds.append(self.daemon(broker, sim, workers=s["inst_workers"], queue=100000,
                                      max_sessions=4 * s["inst_clients"] + 100,
                                      extra=["--share-group", s["inst_group"], "--state-url", red.url]))
            self.stress(broker, warm, f"inst{n}-warmup")
            parts = {"daemons": ds, "broker": broker, "sim": sim, "redis": red}
            m0 = [metrics(d.metrics_port) for d in ds]
            la = loadavg()
            a = self.snapshot(parts, red)
            summ, _ = self.stress(broker, closed, f"inst{n}")
            b = self.snapshot(parts, red)
            m1 = [metrics(d.metrics_port) for d in ds]
        finally:
            for x in (*ds, broker):
                self.procs.stop(x)
        per = [int(requests_counted(y) - requests_counted(x)) for x, y in zip(m0, m1)]
        answered = summ["answered"]
        cpu = self.cpu_split(a, b, summ["client_cpu_secs"])
        return {
            "instances": n,
            "loadavg": la,
            "throughput": summ["okThroughput"],
            "elapsed_ms": summ["elapsedMs"],
            "sent": summ["sent"],
            "answered": answered,
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
            "duplicates": summ["duplicates"],
            "per_instance": per,
            "daemons_counted": sum(per),
            "p50": summ["latencyMs"]["p50"],
            "p99": summ["latencyMs"]["p99"],
            "cpu": cpu,
            "cpu_us_per_request": {k: 1e6 * v / max(1, answered) for k, v in cpu["cpu_secs"].items()},
            "store": self.store_ops(a["redis"], b["redis"], answered, a["store_calls"], b["store_calls"]),
            "summary": summ,
        }


    # ---------------------------------------------------------------------
    # 11. Streaming (issue 13): time to first delta over the sim's own time
    #     to first token, messages per streamed request, daemon CPU

    def streaming_sim(self):
        s = self.s
        args = [
            "--max-num-seqs", s["st_seqs"],
            "--output-tokens", f"fixed:{s['st_tokens']}",
            "--ttft-ms", s["st_ttft_ms"],
            "--ttft-per-token-ms", 0,
            "--itl-base-ms", s["st_itl_ms"],
            "--itl-per-seq-ms", 0,
        ]
        sim = self.sim(*args)
        sim.args = [str(a) for a in args]
        return sim

    def streaming_model(self):
        """What the sim and the daemon's coalescing should give: the first
        delta at the first token, then one at the first token at least the
        interval after the last delta (every ceil(interval / itl) tokens),
        the rest as the last delta, then the final reply."""
        s = self.s
        every = math.ceil(s["st_interval_ms"] / s["st_itl_ms"])
        deltas = 1 + math.ceil((s["st_tokens"] - 1) / every)
        return {
            "tokens_per_delta": every,
            "deltas": deltas,
            "messages": deltas + 1,
            "generation_ms": s["st_ttft_ms"] + (s["st_tokens"] - 1) * s["st_itl_ms"],
        }

    def streaming(self):
        s = self.s
        sim = self.streaming_sim()
        kinds = ["http", "stream", "plain"]
        try:
            calib = self.streaming_calibrate(sim)
            rate = s["st_rate"] or max(10, int(round(s["st_rate_fraction"] * calib["throughput"], -1)))
            log(f"11 streaming: closed loop of {s['st_calib_clients']} streamed sessions {fmt(calib['throughput'])} req/s "
                f"(TTFD p50 {fmt(calib['ttfd_p50'])} ms there): open loop at {rate} req/s")
            reps = []
            for rep in range(s["reps"]):
                log(f"11 streaming: repetition {rep + 1}/{s['reps']} ({rate} req/s open loop for {fmt(s['st_secs'], 0)} s "
                    f"each: HTTP direct, MQTT streamed, MQTT not streamed, rotated)")
                # Rotate the order so that no kind always runs first.
                order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                r = {"order": order}
                for kind in order:
                    if kind == "http":
                        r[kind] = self.streaming_http(sim, rate)
                    else:
                        r[kind] = self.streaming_mqtt(sim, rate, kind == "stream")
                h, x, p = r["http"], r["stream"], r["plain"]
                r["added_p50_ms"] = x["ttfd_p50"] - h["ttft_p50"]
                r["added_p99_ms"] = x["ttfd_p99"] - h["ttft_p99"]
                r["cpu_ratio"] = x["daemon_cpu_us_per_request"] / max(1e-9, p["daemon_cpu_us_per_request"])
                reps.append(r)
                log(f"  HTTP TTFT p50 {fmt(h['ttft_p50'])} p99 {fmt(h['ttft_p99'])} ms | MQTT TTFD p50 {fmt(x['ttfd_p50'])} "
                    f"p99 {fmt(x['ttfd_p99'])} ms: added {fmt(r['added_p50_ms'])} / {fmt(r['added_p99_ms'])} ms | "
                    f"{fmt(x['messages_per_request'])} messages, {fmt(x['deltas_per_request'])} deltas per request, "
                    f"{x['deltas_lost']} lost | daemon CPU {fmt(x['daemon_cpu_us_per_request'])} us streamed, "
                    f"{fmt(p['daemon_cpu_us_per_request'])} us not (x {fmt(r['cpu_ratio'], 3)}); "
                    f"lost {x['lost']} / {p['lost']}")
        finally:
            self.procs.stop(sim)
        return {"settings": {k: v for k, v in s.items() if k.startswith("st_")}, "sim_args": sim.args,
                "rate": rate, "calibration": calib, "model": self.streaming_model(), "reps": reps}

    def streaming_daemon(self, broker, sim):
        s = self.s
        return self.daemon(broker, sim, workers=s["st_workers"], queue=100000,
                           max_sessions=s["st_calib_clients"] + 2 * s["st_sessions"] + 200)

    def streaming_calibrate(self, sim):
        """The rate's reference: a closed loop of many streamed sessions,
        enough to make the machine (not the sessions) the limit."""
        s = self.s
        broker = self.mosquitto()
        d = None
        try:
            d = self.streaming_daemon(broker, sim)
            self.stress(broker, ["--clients", 32, "--messages", 2, "--interval", "0s", "--stream"],
                        "stream-calib-warmup")
            la = loadavg()
            summ, _ = self.stress(broker, ["--clients", s["st_calib_clients"], "--messages", s["st_calib_messages"],
                                           "--interval", "0s", "--stream"], "stream-calib")
        finally:
            for x in (d, broker):
                if x is not None:
                    self.procs.stop(x)
        return {
            "clients": s["st_calib_clients"],
            "throughput": summ["okThroughput"],
            "sent": summ["sent"],
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "p50": summ["latencyMs"]["p50"],
            "p99": summ["latencyMs"]["p99"],
            "ttfd_p50": summ["stream"]["ttfdMs"]["p50"],
            "ttfd_p99": summ["stream"]["ttfdMs"]["p99"],
            "loadavg": la,
            "summary": summ,
        }

    def streaming_http(self, sim, rate):
        """The baseline: the sim's time to first token over HTTP, streamed,
        open loop at the same rate (selfbench)."""
        s = self.s
        la = loadavg()
        m0, c0 = self.sim_load(metrics(sim.port)), cpu_secs(sim.pid)
        hb = self.selfbench(sim.url, 64, s["st_secs"], s["st_warmup_secs"], s["st_tokens"], "stream-http",
                            rate=rate, stream=True)
        m1, c1 = self.sim_load(metrics(sim.port)), cpu_secs(sim.pid)
        n = max(1, hb["requests"])
        ttft, lat = hb["ttftMs"], hb["latencyMs"]
        return {
            "loadavg": la,
            "requests": hb["requests"],
            "errors": hb["errors"],
            "ttft_p50": ttft["p50"], "ttft_p90": ttft["p90"], "ttft_p99": ttft["p99"], "ttft_max": ttft["max"],
            "ttft_count": ttft["count"],
            "p50": lat["p50"], "p99": lat["p99"],
            "selfbench_cpu_us_per_request": 1e6 * hb["cpuSecs"] / n,
            # warm-up included (same rate)
            "sim_cpu_us_per_request_approx": 1e6 * (c1 - c0) / n,
            "sim_ttft_mean_ms": self.sim_ttft_mean(m0, m1),
            "raw": hb,
        }

    @staticmethod
    def sim_ttft_mean(m0, m1):
        """The sim's own mean time to first token between two reads of its
        /metrics (its histogram's sum / count), ms."""
        n = m1["ttft_count"] - m0["ttft_count"]
        return 1000.0 * (m1["ttft_sum"] - m0["ttft_sum"]) / n if n else None

    def streaming_mqtt(self, sim, rate, streamed):
        """A fresh broker and daemon: a warm-up at the rate, then the
        measured open loop, streamed or not."""
        s = self.s
        tag = "stream" if streamed else "plain"
        mode = ["--stream"] if streamed else []
        load = lambda secs: ["--rate", f"{rate}/s", "--duration", f"{secs}s",  # noqa: E731
                             "--sessions", s["st_sessions"], *mode]
        broker = self.mosquitto()
        d = None
        out = {"streamed": streamed}
        try:
            d = self.streaming_daemon(broker, sim)
            self.stress(broker, load(s["st_warmup_secs"]), f"{tag}-warmup")
            parts = {"daemon": d, "broker": broker, "sim": sim}
            out["loadavg"] = loadavg()
            m0 = self.sim_load(metrics(sim.port))
            a = self.snapshot(parts)
            summ, recs = self.stress(broker, load(s["st_secs"]), tag)
            b = self.snapshot(parts)
            m1 = self.sim_load(metrics(sim.port))
            out["daemon_requests_total"] = requests_counted(metrics(d.metrics_port))
        finally:
            for x in (d, broker):
                if x is not None:
                    self.procs.stop(x)
        n = max(1, summ["answered"])
        cpu = {k: b["cpu"][k] - a["cpu"][k] for k in a["cpu"]}
        sent_at = [x[0] for x in recs]
        out.update({
            "sent": summ["sent"],
            "answered": summ["answered"],
            "ok": summ["outcomes"]["ok"],
            "lost": summ["outcomes"]["lost"],
            "outcomes": {k: v for k, v in summ["outcomes"].items() if v},
            "achieved_send_rate": (len(sent_at) - 1) / max(1e-9, (max(sent_at) - min(sent_at)) / 1000.0),
            "p50": summ["latencyMs"]["p50"],
            "p99": summ["latencyMs"]["p99"],
            "daemon_cpu_us_per_request": 1e6 * cpu["daemon"] / n,
            "broker_cpu_us_per_request": 1e6 * cpu["broker"] / n,
            "sim_cpu_us_per_request": 1e6 * cpu["sim"] / n,
            "client_cpu_us_per_request": 1e6 * summ["client_cpu_secs"] / n,
            "cpu": self.cpu_split(a, b, summ["client_cpu_secs"]),
            "sim_ttft_mean_ms": self.sim_ttft_mean(m0, m1),
            "summary": summ,
        })
        if streamed:
            st = summ["stream"]
            out.update({
                "ttfd_p50": st["ttfdMs"]["p50"], "ttfd_p90": st["ttfdMs"]["p90"], "ttfd_p99": st["ttfdMs"]["p99"],
                "ttfd_max": st["ttfdMs"]["max"], "ttfd_count": st["ttfdMs"]["count"],
                "gap_p50": st["gapMs"]["p50"], "gap_p99": st["gapMs"]["p99"],
                "deltas_per_request": st["deltasPerRequest"],
                "messages_per_request": st["messagesPerRequest"],
                "deltas_lost": st["deltasLost"],
                "without_delta": st["withoutDelta"],
                "repeated_deltas": st["repeatedDeltas"],
                "unmatched_deltas": st["unmatchedDeltas"],
            })
        return out


# --------------------------------------------------------------------------
# The table


def fmt(v, digits=None):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}".replace(",", " ")
    if isinstance(v, float):
        if digits is not None:
            return f"{v:.{digits}f}"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}".replace(",", " ")
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def check_le(v, limit, unit):
    if v is None:
        return "n/a"
    m = limit - v
    return f"met (by {fmt(abs(m))}{unit})" if m >= 0 else f"**MISSED** (by {fmt(abs(m))}{unit})"


def check_ge(v, limit, unit=""):
    if v is None:
        return "n/a"
    m = v - limit
    return f"met (by {fmt(abs(m))}{unit})" if m >= 0 else f"**MISSED** (by {fmt(abs(m))}{unit})"


def build_rows(res, s):
    rows = []

    def row(scn, metric, value, baseline="", ratio=None, target="", met=""):
        rows.append({
            "scenario": scn, "metric": metric, "value": value, "baseline": baseline,
            "ratio": ratio, "target": target, "met": met,
        })

    med = lambda reps, key: median([r[key] for r in reps])  # noqa: E731
    medp = lambda reps, a, b: median([r[a][b] for r in reps])  # noqa: E731

    if "overhead" in res:
        reps = res["overhead"]["reps"]
        scn = f"1 overhead ({s['ovh_clients']} closed-loop sessions, zero-latency sim)"
        d_tp, e_tp, h_tp = medp(reps, "daemon", "throughput"), medp(reps, "echo", "throughput"), medp(reps, "http", "throughput")
        tr = med(reps, "throughput_ratio_vs_echo")
        row(scn, "throughput, req/s (baseline: MQTT echo floor)", fmt(d_tp), fmt(e_tp), tr, ">= 0.50 x echo", check_ge(tr, 0.5))
        row(scn, "throughput, req/s (baseline: sim over HTTP, 64 clients)", fmt(d_tp), fmt(h_tp), med(reps, "throughput_ratio_vs_http"))
        for p in ("p50", "p99"):
            dv, ev, hv = medp(reps, "daemon", p), medp(reps, "echo", p), medp(reps, "http", p)
            row(scn, f"latency {p}, ms (baseline: echo floor; HTTP direct {fmt(hv)} ms)", fmt(dv), fmt(ev),
                median([r["daemon"][p] / r["echo"][p] for r in reps]))
        a50, a99 = med(reps, "added_p50_ms"), med(reps, "added_p99_ms")
        row(scn, "added latency p50 over echo, ms", fmt(a50), "", None, "<= 1 ms", check_le(a50, 1.0, " ms"))
        row(scn, "added latency p99 over echo, ms", fmt(a99), "", None, "<= 5 ms", check_le(a99, 5.0, " ms"))
        cpu = medp(reps, "daemon", "cpu_us_per_request")
        ecpu = medp(reps, "echo", "cpu_us_per_request")
        row(scn, "daemon CPU per request, us (baseline: mqtt-echo's)", fmt(cpu), fmt(ecpu),
            median([r["daemon"]["cpu_us_per_request"] / max(1e-9, r["echo"]["cpu_us_per_request"]) for r in reps]),
            "<= 50 us", check_le(cpu, 50.0, " us"))
        lr = s["ovh_light_rate"]
        row(scn, f"(info) added p50 / p99 at {lr} req/s open loop, ms",
            f"{fmt(med(reps, 'light_added_p50_ms'))} / {fmt(med(reps, 'light_added_p99_ms'))}",
            f"echo p50 {fmt(medp(reps, 'echo_light', 'p50'))} / p99 {fmt(medp(reps, 'echo_light', 'p99'))}")

    if "saturation" in res:
        sat = res["saturation"]
        reps = sat["reps"]
        sm = sat["sim_max"]
        scn = (f"2 saturation (max-num-seqs {s['sat_seqs']}, {s['sat_tokens']}-token replies, "
               f"2x load open loop {fmt(s['sat_secs'], 0)} s, {s['sat_workers']} workers, queue {s['sat_queue']})")
        best = [r["best_concurrency"] for r in sm["reps"]]
        gr = med(reps, "goodput_ratio")
        row(scn, f"goodput, req/s (baseline: sim direct at best concurrency {'/'.join(map(str, best))})",
            fmt(med(reps, "goodput")), fmt(sm["max_throughput"]), gr, ">= 0.95", check_ge(gr, 0.95))
        rp = med(reps, "rejection_p99_ms")
        row(scn, "overloaded replies p99, ms (baseline: echo p99 at the same rate)", fmt(rp),
            fmt(sat["echo_baseline"]["p99"]), (rp / sat["echo_baseline"]["p99"]) if rp and sat["echo_baseline"]["p99"] else None,
            "<= 5 ms", check_le(rp, 5.0, " ms"))
        lost = max(r["lost"] for r in reps)
        row(scn, "lost (worst repetition)", fmt(lost), "", None, "0", "met" if lost == 0 else f"**MISSED** ({lost} lost)")
        row(scn, "(info) offered / sent rate, req/s; rejected per run",
            f"{fmt(med(reps, 'offered_rate'))} / {fmt(med(reps, 'achieved_send_rate'))}; {fmt(med(reps, 'rejections'))}")
        row(scn, "(info) ok latency p50 / p99, ms (baseline: sim direct p99)",
            f"{fmt(med(reps, 'ok_p50_ms'))} / {fmt(med(reps, 'ok_p99_ms'))}", fmt(sm.get("p99_at_seqs")))

    if "burst" in res:
        reps = res["burst"]["reps"]
        n = s["burst_requests"]
        scn = f"3 burst ({n} requests from {n} sessions in 1 s, queue {s['burst_queue']})"
        acc = all(r["accounted"] for r in reps)
        row(scn, "accounted: answered / daemon-counted / sent (worst rep)",
            f"{fmt(min(r['answered'] for r in reps))} / {fmt(int(min(r['daemon_counted'] for r in reps)))} / {fmt(n)}",
            "", None, "all", "met" if acc else "**MISSED**")
        row(scn, "(info) send rate achieved by vllm-stress, req/s (span of sends, ms)",
            f"{fmt(med(reps, 'achieved_send_rate'))} ({fmt(med(reps, 'send_span_ms'))} ms)", f"{n} in 1 s")
        row(scn, "(info) replies: ok / overloaded; ok p99, ms",
            f"{fmt(median([r['outcomes'].get('ok', 0) for r in reps]))} / {fmt(med(reps, 'overload_replies'))}; "
            f"{fmt(med(reps, 'ok_p99_ms'))}")
        op = med(reps, "overload_p99_ms")
        row(scn, "overloaded replies p99, ms (baseline: echo p99, same burst)", fmt(op),
            fmt(median([r["echo"]["p99"] for r in reps])), med(reps, "overload_p99_ratio_vs_echo"),
            "<= 50 ms", check_le(op, 50.0, " ms"))
        row(scn, "peak RSS (VmHWM), MiB (baseline: RSS before the burst)",
            fmt(med(reps, "peak_rss_kib") / 1024.0), fmt(med(reps, "rss_before_kib") / 1024.0),
            median([r["peak_rss_kib"] / r["rss_before_kib"] for r in reps]), "reported", "reported")

    if "sessions" in res:
        reps = res["sessions"]["reps"]
        scn = f"4 session scale ({s['sess_sessions']} sessions, one turn each)"
        bps = med(reps, "bytes_per_session")
        hist = med(reps, "history_text_bytes_per_session")
        row(scn, "RSS per session, bytes (baseline: history text per session)", fmt(bps), fmt(hist),
            bps / hist if bps and hist else None, f"<= 2048 + {fmt(hist)}", check_le(bps, 2048.0 + hist, " B"))
        row(scn, "(info) RSS before / after, MiB",
            f"{fmt(med(reps, 'rss_before_kib') / 1024.0)} / {fmt(med(reps, 'rss_after_kib') / 1024.0)}",
            f"sessions gauge {fmt(med(reps, 'sessions_gauge_after'))}")

    if "sweep" in res:
        sw = res["sweep"]
        scn = (f"5 worker sweep (max-num-seqs {s['sat_seqs']}, {fmt(sw['offered_rate'])} req/s offered, "
               f"queue {s['sweep_queue']})")
        p99_base = sw.get("sim_p99_at_seqs")
        for w, reps in sw["by_workers"].items():
            row(scn, f"workers {w}: goodput, req/s (baseline: sim max)", fmt(med(reps, "goodput")),
                fmt(sw["sim_max"]), med(reps, "goodput_ratio"))
            p99 = med(reps, "ok_p99_ms")
            row(scn, f"workers {w}: ok p99, ms (baseline: sim direct p99 at {s['sat_seqs']})", fmt(p99),
                fmt(p99_base), (p99 / p99_base) if p99 and p99_base else None)
    if "routing" in res:
        rt = res["routing"]
        reps = rt["reps"]
        st = rt["setup"]
        pols = [p for p in s["rt_policies"] if all(p in r for r in reps)]
        scn = (f"6 routing ({s['rt_sims']} sims x max-num-seqs {s['rt_seqs']}, prefix cache {st['cache_blocks']} blocks/sim; "
               f"project system prompt {st['system_prompt_tokens']} tokens; {s['rt_sessions']} sessions x {st['turns']} turns, "
               f"{fmt(s['rt_rate'])} req/s open loop; {s['rt_tokens']}-token replies)")
        medp = lambda pol, k: median([r[pol][k] for r in reps])  # noqa: E731
        medr = lambda pol, k: median([r[pol]["vs_rr"][k] for r in reps])  # noqa: E731
        for pol in pols:
            if pol == "round-robin":
                continue
            r50 = medr(pol, "ttft_p50")
            tp = medr(pol, "throughput")
            main = pol == "affinity"
            row(scn, f"{pol}: TTFT p50, ms (sims' histograms; baseline: round-robin)", fmt(medp(pol, "ttft_p50_ms")),
                fmt(medp("round-robin", "ttft_p50_ms")), r50,
                "<= 0.5 x round-robin" if main else "", check_le(r50, 0.5, "") if main else "")
            row(scn, f"{pol}: TTFT p99, ms (baseline: round-robin)", fmt(medp(pol, "ttft_p99_ms")),
                fmt(medp("round-robin", "ttft_p99_ms")), medr(pol, "ttft_p99"))
            row(scn, f"{pol}: TTFT mean, ms (histograms' sum / count; baseline: round-robin)",
                fmt(medp(pol, "ttft_mean_ms")), fmt(medp("round-robin", "ttft_mean_ms")), medr(pol, "ttft_mean"))
            row(scn, f"{pol}: throughput at saturation, req/s (goodput at {fmt(s['rt_sat_factor'])}x the pool's "
                f"capacity, workers auto; baseline: round-robin)", fmt(medp(pol, "sat_goodput")),
                fmt(medp("round-robin", "sat_goodput")), tp,
                ">= 1.0 x round-robin" if main else "", check_ge(tp, 1.0) if main else "")
            row(scn, f"{pol}: reply latency p50, ms (baseline: round-robin)", fmt(medp(pol, "reply_p50_ms")),
                fmt(medp("round-robin", "reply_p50_ms")), medr(pol, "reply_p50"))
        row(scn, "prefix-cache hit rate, hits / queries over the sims: " + " / ".join(pols),
            " / ".join(fmt(medp(p, "hit_rate"), 3) for p in pols))
        row(scn, "(info) reply latency p99, ms: " + " / ".join(pols),
            " / ".join(fmt(medp(p, "reply_p99_ms")) for p in pols))
        row(scn, "(info) requests per sim, first repetition: " + " / ".join(pols),
            " / ".join("-".join(str(n) for n in reps[0][p]["per_sim_requests"]) for p in pols))
        row(scn, "(info) saturation: offered req/s; hit rate; TTFT p50, ms: " + " / ".join(pols),
            f"{fmt(medp(pols[0], 'sat_offered_rate'))}; " + " / ".join(fmt(medp(p, "sat_hit_rate"), 3) for p in pols)
            + "; " + " / ".join(fmt(medp(p, "sat_ttft_p50_ms")) for p in pols))
        bad = max(r[p]["not_ok"] for r in reps for p in pols)
        row(scn, "replies not ok below capacity (worst run)", fmt(bad), "", None, "0",
            "met" if bad == 0 else f"**MISSED** ({bad})")
        lost = max(max(r[p]["lost"], r[p]["sat_lost"]) for r in reps for p in pols)
        row(scn, "lost (worst run)", fmt(lost), "", None, "0", "met" if lost == 0 else f"**MISSED** ({lost} lost)")

    if "auto" in res:
        au = res["auto"]
        scn = (f"7 workers auto vs {s['auto_fixed']} (one sim, replies of {s['auto_tokens'] // 2}-{s['auto_tokens'] * 3 // 2} "
               f"tokens, 2x its max offered "
               f"open loop, queue {s['auto_queue']}, {au['reps']} repetition(s))")
        for seqs, runs in au["by_seqs"].items():
            cap = median([m["max_throughput"] for m in runs["sim_max"]])
            a, f = runs["auto"], runs["fixed"]
            ar = median([r["goodput_ratio"] for r in a])
            row(scn, f"max-num-seqs {seqs}: auto goodput, req/s (baseline: sim max)",
                fmt(median([r["goodput"] for r in a])), fmt(cap), ar, ">= 0.95", check_ge(ar, 0.95))
            if f:
                row(scn, f"max-num-seqs {seqs}: {s['auto_fixed']} workers goodput, req/s (baseline: sim max)",
                    fmt(median([r["goodput"] for r in f])), fmt(cap), median([r["goodput_ratio"] for r in f]))
            occ = lambda runs: fmt(median([r["sim_running_mean"] for r in runs]) / int(seqs), 3) if runs else "n/a"  # noqa: E731
            wm = median([r["sim_waiting_mean"] for r in a])
            row(scn, f"max-num-seqs {seqs}: (info) sim batch occupancy, running mean / max-num-seqs: auto; "
                f"{s['auto_fixed']} workers",
                f"{occ(a)}; {occ(f)}")
            row(scn, f"max-num-seqs {seqs}: auto: sim's num_requests_waiting mean / p95 / max (steady window)",
                f"{fmt(wm)} / {fmt(median([r['sim_waiting_p95'] for r in a]))} / {fmt(median([r['sim_waiting_max'] for r in a]))}",
                "", None, "mean <= 1", check_le(wm, 1.0, ""))
            row(scn, f"max-num-seqs {seqs}: (info) auto: sim running mean; daemon limit min-max in window; "
                "limit >= batch after, s; sim waiting mean / max over the whole run (ramp included)",
                f"{fmt(median([r['sim_running_mean'] for r in a]))}; "
                f"{fmt(median([r['limit_window_min'] for r in a]))}-{fmt(median([r['limit_window_max'] for r in a]))}; "
                f"{fmt(median([r['limit_reached_batch_at_secs'] for r in a]))}; "
                f"{fmt(median([r['sim_waiting_mean_run'] for r in a]))} / {fmt(median([r['sim_waiting_max_run'] for r in a]))}")
            row(scn, f"max-num-seqs {seqs}: (info) ok p50 / p99, ms: auto; {s['auto_fixed']} workers",
                f"{fmt(median([r['ok_p50_ms'] for r in a]))} / {fmt(median([r['ok_p99_ms'] for r in a]))}; "
                f"{fmt(median([r['ok_p50_ms'] for r in f]))} / {fmt(median([r['ok_p99_ms'] for r in f]))}",
                f"sim waiting with {s['auto_fixed']} workers: mean {fmt(median([r['sim_waiting_mean'] for r in f]))}")
        lost = max(r["lost"] for runs in au["by_seqs"].values() for k in ("auto", "fixed") for r in runs[k])
        row(scn, "lost (worst run)", fmt(lost), "", None, "0", "met" if lost == 0 else f"**MISSED** ({lost} lost)")

    if "failover" in res:
        reps = res["failover"]["reps"]
        scn = (f"8 failover ({s['fo_sims']} sims x max-num-seqs {s['fo_seqs']}, {fmt(s['fo_rate'])} req/s open loop "
               f"for {fmt(s['fo_secs'], 0)} s, one sim SIGKILLed at {fmt(s['fo_kill_at'], 0)} s; affinity, auto)")
        lost = max(r["lost"] for r in reps)
        errs = max(r["errors"] for r in reps)
        row(scn, "lost (worst repetition; baseline: sent)", fmt(lost), fmt(min(r["sent"] for r in reps)), None, "0",
            "met" if lost == 0 else f"**MISSED** ({lost} lost)")
        row(scn, "error replies (worst repetition; 5 min deadlines)", fmt(errs), "", None, "0",
            "met" if errs == 0 else f"**MISSED** (" + "; ".join(
                f"rep {i + 1}: " + ", ".join(f"{k} {v}" for k, v in r["error_outcomes"].items())
                for i, r in enumerate(reps) if r["error_outcomes"]) + ")")
        row(scn, "(info) requests in flight on the killed sim at the kill; requests spanning the kill +-0.1 s (not ok)",
            f"{fmt(median([r['victim_in_flight'] for r in reps]))}; {fmt(median([r['spanning_kill'] for r in reps]))} "
            f"({fmt(max(r['spanning_kill_not_ok'] for r in reps))})")
        row(scn, "(info) ok p99 before / after the kill, ms; daemon retries",
            f"{fmt(median([r['ok_p99_before_ms'] for r in reps]))} / {fmt(median([r['ok_p99_after_ms'] for r in reps]))}; "
            f"{fmt(median([r['daemon_retries'] for r in reps]))}")

    if "store_cost" in res:
        sc = res["store_cost"]
        reps = sc["reps"]
        scn = (f"9 store cost (one daemon, zero-latency sim; {fmt(sc['rate'])} req/s open loop = "
               f"{fmt(s['sc_rate_fraction'])} x the lower closed-loop throughput, {fmt(s['sc_sessions'])} sessions, "
               f"{fmt(s['sc_secs'], 0)} s; --state-url redis, baseline memory, alternated)")
        mo = lambda store, k: median([r[store]["open"][k] for r in reps])  # noqa: E731
        for p in ("p50", "p99"):
            row(scn, f"latency {p}, ms, redis (baseline: memory)", fmt(mo("redis", p)), fmt(mo("memory", p)),
                median([r["redis"]["open"][p] / r["memory"]["open"][p] for r in reps]))
        a50, a99 = med(reps, "added_p50_ms"), med(reps, "added_p99_ms")
        row(scn, "added latency p50, ms (redis - memory, median of repetitions)", fmt(a50), "", None,
            "<= 0.5 ms", check_le(a50, 0.5, " ms"))
        row(scn, "added latency p99, ms (redis - memory)", fmt(a99), "", None, "reported", "reported")
        row(scn, "daemon CPU per request, us, redis (baseline: memory)", fmt(mo("redis", "daemon_cpu_us_per_request")),
            fmt(mo("memory", "daemon_cpu_us_per_request")), med(reps, "cpu_ratio"))
        so = lambda k: median([r["redis"]["open"]["store"][k] for r in reps])  # noqa: E731
        row(scn, "store round trips per request (the daemon's vllm_mqttd_store_calls_total)",
            fmt(so("round_trips_per_request")), "", None, "3 (admit, release, finish)", "reported")
        row(scn, "(info) Redis commands per request (scripts' own included); Redis CPU per request, us",
            f"{fmt(so('commands_per_request'))}; {fmt(mo('redis', 'redis_cpu_us_per_request'))}")
        row(scn, "(info) broker CPU per request, us: redis / memory",
            f"{fmt(mo('redis', 'broker_cpu_us_per_request'))} / {fmt(mo('memory', 'broker_cpu_us_per_request'))}")
        mc = lambda store: median([r[store]["closed"]["throughput"] for r in reps])  # noqa: E731
        row(scn, f"(info) closed loop ({s['sc_clients']} sessions) throughput, req/s, redis (baseline: memory)",
            fmt(mc("redis")), fmt(mc("memory")), med(reps, "closed_throughput_ratio"))
        row(scn, "(info) sent rate achieved, req/s: redis / memory; load average (1 min) over the runs",
            f"{fmt(mo('redis', 'achieved_send_rate'))} / {fmt(mo('memory', 'achieved_send_rate'))}; "
            + "-".join(fmt(f(r[st]["loadavg"][0] for r in reps for st in ("memory", "redis"))) for f in (min, max)))
        lost = max(r[st][ph]["lost"] for r in reps for st in ("memory", "redis") for ph in ("open", "closed"))
        notok = max(r[st]["open"]["sent"] - r[st]["open"]["ok"] for r in reps for st in ("memory", "redis"))
        row(scn, "lost; not ok (worst run)", f"{fmt(lost)}; {fmt(notok)}", "", None, "0",
            "met" if lost == 0 and notok == 0 else f"**MISSED** ({lost} lost, {notok} not ok)")

    if "instances" in res:
        reps = res["instances"]["reps"]
        counts = [str(n) for n in s["inst_counts"]]
        scn = (f"10 instances ({s['inst_clients']} closed-loop sessions x {s['inst_messages']} requests; one Mosquitto, "
               f"one share group, one Redis; zero-latency sim, {s['inst_workers']} workers each)")
        mi = lambda n, k: median([r[n][k] for r in reps])  # noqa: E731
        for n in counts:
            row(scn, f"{n} instance(s): throughput, req/s (baseline: 1 instance)", fmt(mi(n, "throughput")),
                fmt(mi(counts[0], "throughput")), median([r[n]["ratio_vs_1"] for r in reps]))
        parts = ["daemons", "broker", "redis", "sim", "stress client"]
        for n in counts:
            cores = {k: median([r[n]["cpu"]["cpu_secs"][k] / r[n]["cpu"]["wall_secs"] for r in reps]) for k in parts}
            others = median([r[n]["cpu"]["others_secs"] / r[n]["cpu"]["wall_secs"] for r in reps])
            busy = median([r[n]["cpu"]["machine_busy_fraction"] for r in reps])
            row(scn, f"{n} instance(s): (info) CPU in cores: daemons / mosquitto / redis / sim / stress client / "
                f"others; machine busy",
                " / ".join(fmt(cores[k], 2) for k in parts) + f" / {fmt(others, 2)}; {fmt(100.0 * busy, 0)} %")
        row(scn, "(info) daemon CPU per request, us: " + " / ".join(counts) + " instance(s)",
            " / ".join(fmt(median([r[n]["cpu_us_per_request"]["daemons"] for r in reps])) for n in counts))
        row(scn, "(info) latency p50 / p99, ms: " + " / ".join(counts) + " instance(s)",
            " / ".join(f"{fmt(mi(n, 'p50'))} / {fmt(mi(n, 'p99'))}" for n in counts))
        row(scn, "(info) requests per instance, first repetition",
            "; ".join("-".join(str(x) for x in reps[0][n]["per_instance"]) for n in counts))
        lost = max(r[n]["lost"] for r in reps for n in counts)
        unanswered = max(r[n]["sent"] - r[n]["answered"] for r in reps for n in counts)
        notok = max(r[n]["sent"] - r[n]["ok"] for r in reps for n in counts)
        row(scn, "lost; not ok (worst run)", f"{fmt(lost)}; {fmt(notok)}", "", None, "0",
            "met" if lost == 0 and unanswered == 0 and notok == 0 else f"**MISSED** ({lost} lost, {notok} not ok)")

    if "streaming" in res:
        sr = res["streaming"]
        reps = sr["reps"]
        mdl = sr["model"]
        cal = sr["calibration"]
        scn = (f"11 streaming (sim: TTFT {fmt(s['st_ttft_ms'], 0)} ms, ITL {fmt(s['st_itl_ms'], 0)} ms, both fixed, "
               f"{s['st_tokens']}-token replies; {fmt(sr['rate'])} req/s open loop = {fmt(s['st_rate_fraction'])} x the "
               f"streamed closed-loop throughput, {fmt(s['st_sessions'])} sessions, {fmt(s['st_secs'], 0)} s; "
               f"default --stream-interval ({fmt(s['st_interval_ms'], 0)} ms); HTTP direct, streamed, not streamed "
               f"alternated)")
        mk = lambda kind, k: median([r[kind][k] for r in reps])  # noqa: E731
        for p in ("p50", "p99"):
            row(scn, f"time to first delta {p}, ms (baseline: HTTP direct time to first token {p}, same rate)",
                fmt(mk("stream", f"ttfd_{p}")), fmt(mk("http", f"ttft_{p}")),
                median([r["stream"][f"ttfd_{p}"] / r["http"][f"ttft_{p}"] for r in reps]))
        a50, a99 = med(reps, "added_p50_ms"), med(reps, "added_p99_ms")
        row(scn, "added time to first delta p50, ms (MQTT TTFD - HTTP TTFT, median of repetitions)", fmt(a50), "",
            None, "<= 2 ms", check_le(a50, 2.0, " ms"))
        row(scn, "added time to first delta p99, ms (MQTT TTFD - HTTP TTFT)", fmt(a99), "", None, "reported",
            "reported")
        mp = mk("stream", "messages_per_request")
        row(scn, f"messages per streamed request (baseline: the model, {mdl['deltas']} deltas + the final reply)",
            fmt(mp), fmt(mdl["messages"]), mp / mdl["messages"], "reported", "reported")
        row(scn, "(info) deltas per request; deltas lost; requests without a delta (worst run); gap between deltas "
            "p50 / p99, ms",
            f"{fmt(mk('stream', 'deltas_per_request'))}; {fmt(max(r['stream']['deltas_lost'] for r in reps))}; "
            f"{fmt(max(r['stream']['without_delta'] for r in reps))}; "
            f"{fmt(mk('stream', 'gap_p50'))} / {fmt(mk('stream', 'gap_p99'))}",
            f"model: a delta every {mdl['tokens_per_delta']} tokens ({fmt(mdl['tokens_per_delta'] * s['st_itl_ms'], 0)} ms)")
        c, cb = mk("stream", "daemon_cpu_us_per_request"), mk("plain", "daemon_cpu_us_per_request")
        row(scn, "daemon CPU per request, us, streamed (baseline: not streamed, same rate)", fmt(c), fmt(cb),
            med(reps, "cpu_ratio"), "reported", "reported")
        row(scn, "(info) CPU per request, us, streamed / not streamed: mosquitto; load generator; sim",
            "; ".join(f"{fmt(mk('stream', k))} / {fmt(mk('plain', k))}"
                      for k in ("broker_cpu_us_per_request", "client_cpu_us_per_request", "sim_cpu_us_per_request")))
        row(scn, "(info) reply latency p50 / p99, ms: streamed; not streamed; HTTP direct",
            f"{fmt(mk('stream', 'p50'))} / {fmt(mk('stream', 'p99'))}; {fmt(mk('plain', 'p50'))} / "
            f"{fmt(mk('plain', 'p99'))}; {fmt(mk('http', 'p50'))} / {fmt(mk('http', 'p99'))}",
            f"model: {fmt(mdl['generation_ms'], 0)} ms")
        row(scn, "(info) the sim's own TTFT mean (its histogram's sum / count), ms: HTTP run; streamed; not streamed",
            f"{fmt(mk('http', 'sim_ttft_mean_ms'))}; {fmt(mk('stream', 'sim_ttft_mean_ms'))}; "
            f"{fmt(mk('plain', 'sim_ttft_mean_ms'))}")
        runs = [r[k] for r in reps for k in ("http", "stream", "plain")]
        row(scn, f"(info) closed loop of {s['st_calib_clients']} streamed sessions: req/s, TTFD p50 / p99, ms "
            "(sets the rate); load average (1 min) over the runs",
            f"{fmt(cal['throughput'])}, {fmt(cal['ttfd_p50'])} / {fmt(cal['ttfd_p99'])}; "
            + "-".join(fmt(f(x["loadavg"][0] for x in runs)) for f in (min, max)))
        lost = max(max(r[k]["lost"] for r in reps for k in ("stream", "plain")), cal["lost"])
        notok = max(max(r[k]["sent"] - r[k]["ok"] for r in reps for k in ("stream", "plain")),
                    max(r["http"]["errors"] for r in reps))
        row(scn, "lost; not ok or HTTP errors (worst run)", f"{fmt(lost)}; {fmt(notok)}", "", None, "0",
            "met" if lost == 0 and notok == 0 else f"**MISSED** ({lost} lost, {notok} not ok)")
    return rows


def markdown(rows):
    out = ["| scenario | metric | value | baseline | ratio | target | met? |", "|---|---|---|---|---|---|---|"]
    last = None
    for r in rows:
        scn = r["scenario"] if r["scenario"] != last else ""
        last = r["scenario"]
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        out.append(f"| {scn} | {r['metric']} | {r['value']} | {r['baseline']} | {ratio} | {r['target']} | {r['met']} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Machine info


def sh(argv, any_status=False):
    """A command's output (None if it cannot run or fails, unless any_status)."""
    try:
        r = subprocess.run(argv, text=True, capture_output=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 and not any_status:
        return None
    return (r.stdout + r.stderr).rstrip()


def machine():
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1])
    except OSError:
        pass
    mosq = sh([MOSQUITTO, "-h"], any_status=True)
    status = sh(["git", "status", "--porcelain", "--untracked-files=no"]) or ""
    return {
        "nproc": int(sh(["nproc"]) or os.cpu_count() or 0),
        "cpu_model": cpu,
        "mem_total_kib": mem,
        "kernel": platform.release(),
        "os": platform.platform(),
        "rustc": sh(["rustc", "--version"]),
        "cargo": sh(["cargo", "--version"]),
        "mosquitto": mosq.splitlines()[0] if mosq else None,
        "python": platform.python_version(),
        # BENCH_COMMIT: the commit of a tree without .git (a git archive)
        "git_commit": sh(["git", "rev-parse", "HEAD"]) or os.environ.get("BENCH_COMMIT"),
        "git_dirty": bool(status.strip()),
        "git_modified_files": [line[3:] for line in status.splitlines()],
        "clk_tck": CLK_TCK,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "redis": (sh([REDIS_SERVER, "--version"]) or None) if Path(REDIS_SERVER).exists() else None,
    }


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="each scenario briefly, once (a smoke check)")
    ap.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10,11", help="scenarios to run, e.g. 1,3 (default: all)")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions of every measurement (default 3, burst 5; 1 with --quick)")
    ap.add_argument("--build-secs", type=float, default=None, help="(from bench.sh) release build time")
    ap.add_argument("--started", type=float, default=None, help="(from bench.sh) start time, epoch seconds")
    ap.add_argument("--out", default=None, help="result file (default bench/results/<YYYY-MM-DD>.json)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work directory with every log")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",") if x}

    for k, p in BINS.items():
        if not p.exists():
            sys.exit(f"bench: {p} is missing; build with cargo build --release --workspace --bins --examples")
    if not Path(MOSQUITTO).exists():
        sys.exit(f"bench: {MOSQUITTO} is missing (apt-get install mosquitto, or set MOSQUITTO)")
    if only & {9, 10}:
        for exe in (REDIS_SERVER, REDIS_CLI):
            if not Path(exe).exists():
                sys.exit(f"bench: {exe} is missing (apt-get install redis-server, or set REDIS_SERVER and REDIS_CLI)")

    started = args.started or time.time()
    workdir = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    pidfile = os.environ.get("BENCH_PIDFILE")

    # INT (Ctrl-C), TERM and HUP all stop the run: the first one unwinds
    # through the `finally` that stops every process; later ones (Ctrl-C
    # reaches both bench.sh, which forwards it, and this process) are
    # ignored so that they cannot interrupt that cleanup. SIGINT is set
    # explicitly: a shell starts background jobs with it ignored.
    interrupted = []

    def on_signal(signum, _frame):
        if interrupted:
            return
        interrupted.append(signum)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    b = Bench(args, workdir, pidfile)
    s = b.s
    if args.reps:
        s["reps"] = s["burst_reps"] = max(1, args.reps)
    info = machine()
    log(f"{'quick' if args.quick else 'full'} run; logs in {workdir}; "
        f"{info['nproc']} CPUs ({info['cpu_model']}), commit {(info['git_commit'] or '?')[:10]}")
    res = {}
    timings = {}
    ok = False
    try:
        def timed(key, fn):
            t = time.monotonic()
            res[key] = fn()
            timings[key] = time.monotonic() - t

        if 1 in only:
            timed("overhead", b.overhead)
        if 2 in only or 5 in only:
            sim = b.saturated_sim()
            try:
                t = time.monotonic()
                log("2 saturation: the sim's own best throughput")
                simmax = b.sim_max(sim)
                timings["sim_max"] = time.monotonic() - t
                if 2 in only:
                    timed("saturation", lambda: b.saturation(sim, simmax))
                if 5 in only:
                    timed("sweep", lambda: b.sweep(sim, simmax))
            finally:
                b.procs.stop(sim)
        if 3 in only:
            timed("burst", b.burst)
        if 4 in only:
            timed("sessions", b.sessions)
        if 6 in only:
            timed("routing", b.routing)
        if 7 in only:
            timed("auto", b.auto)
        if 8 in only:
            timed("failover", b.failover)
        if 9 in only:
            timed("store_cost", b.store_cost)
        if 10 in only:
            timed("instances", b.instances)
        if 11 in only:
            timed("streaming", b.streaming)
        ok = True
    finally:
        b.procs.stop_all()
        if interrupted:
            log(f"interrupted by signal {interrupted[0]}; every process stopped; logs kept in {workdir}")
        elif not ok:
            log(f"FAILED; logs kept in {workdir}")

    rows = build_rows(res, s)
    table = markdown(rows)
    wall = time.time() - started
    date = datetime.date.today().isoformat()
    # A smoke run must not overwrite the day's full results.
    default = f"{date}-quick.json" if args.quick else f"{date}.json"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": date,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "mode": "quick" if args.quick else "full",
        "wall_secs": wall,
        "build_secs": args.build_secs,
        "scenario_secs": timings,
        "machine": info,
        "loadavg_at_end": loadavg(),
        "settings": s,
        "notes": (
            "value and baseline are medians over repetitions; ratio is the median of the "
            "per-repetition ratios (value and baseline measured back to back)"
        ),
        "table": rows,
        "markdown": table,
        "results": res,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(out)
    print(table, end="")
    print(
        f"\n{info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}, {info['rustc']}, "
        f"commit {(info['git_commit'] or '?')[:10]}{' (dirty)' if info['git_dirty'] else ''}; "
        f"{'quick' if args.quick else 'full'} run, {s['reps']} repetition(s), "
        f"wall {wall:.0f} s (build {args.build_secs if args.build_secs is not None else '?'} s)"
    )
    print(f"raw numbers: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"logs kept in {workdir}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
