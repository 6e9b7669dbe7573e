"""Measure the API under variants (bench/variants/), one server at a time, with the same seed,
load, pinning and wrk script as `make bench`: accepts/s and the server's CPU per request under
wrk, then the in-process anatomy (CPU per accept, Redis/SQL/broker counts).

    python -m bench.experiment                                 # every variant, then all together
    python -m bench.experiment baseline pool_32 no_sent_events

Writes var/bench/experiment.json. Not part of `make bench`: it is how a proposed fix is sized
before the application changes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench import procs
from bench.run import VAR_DIR, Bench, Config, drop_database
from bench.variants import VARIANTS


def main() -> int:
    names = sys.argv[1:] or [*VARIANTS, "+".join(n for n in VARIANTS if n != "baseline")]
    unknown = [n for n in names if any(part not in VARIANTS for part in n.split("+"))]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    config = Config.from_env()
    procs.raise_nofile()
    procs.pin(config.load_cpus)
    procs.install_signal_handlers(config.budget_seconds)
    bench = Bench(config)
    out: dict[str, Any] = {}
    try:
        bench.setup()
        for name in names:
            bench.flush_redis()
            bench.warm_caches()
            env = dict(bench.env, BENCH_VARIANT=name)
            server = bench.start_uvicorn(
                "exp-server", "bench.variants.asgi:application", env, config.web_workers
            )
            try:
                bench.run_wrk(server, duration=config.http_warmup)
                result = bench.run_wrk(server, duration=config.http_duration)
            finally:
                bench.procs.stop(server)
            result["anatomy"] = anatomy = bench.anatomy(name)
            out[name] = result
            per = anatomy["per_request"]
            print(
                f"{name}\n    wrk {result['rate_per_s']:7.1f} req/s, "
                f"{result.get('server_cpu_ms_per_request', 0):6.2f} ms server CPU/req, "
                f"p99 {result.get('p99_ms')} ms | in-process "
                f"{anatomy['cpu_ms_per_request']:6.2f} ms CPU/req, "
                f"{per.get('redis sends', 0)} redis sends, "
                f"{per.get('redis new connections', 0)} new redis conns, "
                f"{per.get('redis.Redis clients built', 0)} clients built, "
                f"{per.get('sql statements', 0)} sql",
                flush=True,
            )
    finally:
        bench.procs.stop_all()
        (VAR_DIR / "experiment.json").write_text(json.dumps(out, indent=2) + "\n")
        from django.db import connections

        connections.close_all()
        drop_database(bench.env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
