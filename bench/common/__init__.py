"""What every benchmark under ``bench/`` shares, so that each benchmark file holds only its contenders and workload.

- ``load``: the closed-loop load generator (httpx or aiohttp) and what it measures per request: latency,
  TTFT, inter-token gaps, output tokens from ``usage``; percentiles and a streaming level's summary.
- ``servers``: starting what is measured on a free loopback port and waiting until it is ready: inhouse
  through ``tests/process.py``'s ``ServerProcess`` (``--auth none`` unless asked for keys), peers as plain
  subprocesses in their own session; both stopped on exit.
- ``machine``: how busy the machine was: CPU cores used by other processes, a process tree's CPU and RSS,
  waiting for an idle machine, re-measuring a disturbed level.
- ``report``: the table on stdout, PASS/FAIL lines, and the JSON file with its ``meta`` block.
- ``local``: inhouse's transformers engine in-process (``--model``, ``--dtype``, ``--cache-dir``), for a
  benchmark that measures one engine setting with no server in between.

Nothing here knows a benchmark's contenders or targets; nothing here imports torch or inhouse's engine at import
time (``local`` imports the engine when called).
Benchmarks import it as ``bench.common`` after putting the repository root on ``sys.path``.
"""
