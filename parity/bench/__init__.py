"""parity.bench: latency, throughput, goodput and energy of any OpenAI-compatible endpoint.

Entry points::

    from parity.bench.run_config import BenchConfig
    from parity.bench.runner import run_bench                  # run_bench(cfg) -> result dict
    from parity.bench.result import save_result, load_result, render_table
    from parity.bench.report import write_report                # write_report([paths], "report.html")
    from parity.bench.fake_server import FakeServer, Script     # scripted SSE server for tests

Kept import-light: nothing heavy is imported here.
"""
