"""gunicorn hooks that profile each worker (``-c python:bench.gunicorn_profile``).

Used by ``python -m bench --profile ingest`` only, never by the measured runs. Each
worker starts profiling after its first ``BENCH_PROFILE_SKIP`` requests (imports and
first connections are warm-up, not steady state) and writes its profile into
``BENCH_PROFILE_DIR`` when it exits: ``<pid>.samples.json`` from ``bench.sampler``
(``BENCH_PROFILER=sample``, the default, on ``BENCH_PROFILE_CLOCK`` ``cpu`` or ``wall``)
or ``<pid>.prof`` from cProfile on CPU time (``BENCH_PROFILER=cprofile``).

The project's own config file (``BENCH_BASE_GUNICORN_CONFIG``, the ``--config`` that
``ingest_command`` passes) is loaded first, so the profiled server is configured like
the measured one; its hooks of the same names still run.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import time
from pathlib import Path
from typing import Any

from bench.sampler import Sampler

_base: dict[str, Any] = {}
if os.environ.get("BENCH_BASE_GUNICORN_CONFIG"):
    _base = runpy.run_path(os.environ["BENCH_BASE_GUNICORN_CONFIG"])
    globals().update({name: value for name, value in _base.items() if not name.startswith("__")})

_state: dict[str, Any] = {"requests": 0, "profiler": None}


def _chain(name: str, *args: Any) -> None:
    hook = _base.get(name)
    if callable(hook):
        hook(*args)


def pre_request(worker: Any, req: Any) -> None:
    _chain("pre_request", worker, req)
    _state["requests"] += 1
    if _state["requests"] != int(os.environ.get("BENCH_PROFILE_SKIP", "100")):
        return
    if os.environ.get("BENCH_PROFILER", "sample") == "cprofile":
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        _state["profiler"] = profile
    else:
        sampler = Sampler(clock=os.environ.get("BENCH_PROFILE_CLOCK", "cpu"))
        sampler.start()
        _state["profiler"] = sampler


def worker_exit(server: Any, worker: Any) -> None:
    _chain("worker_exit", server, worker)
    profiler, _state["profiler"] = _state["profiler"], None
    directory = Path(os.environ["BENCH_PROFILE_DIR"])
    if isinstance(profiler, cProfile.Profile):
        profiler.disable()
        profiler.dump_stats(str(directory / f"{os.getpid()}.prof"))
    elif isinstance(profiler, Sampler):
        profiler.stop()
        profiler.dump(directory / f"{os.getpid()}.samples.json")
