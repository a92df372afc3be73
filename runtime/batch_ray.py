"""`sparrow batch --ray`: the same job on a Ray cluster. The driver (runtime.batch_job.run_batch) reads, checks and
tokenizes the lines and writes every record as it comes back, exactly as in process, so the output contract holds
unchanged (resumable, one record per line, deterministic given the seed); Ray Data sends the requests in blocks to
actors that each hold the model and a batching engine (runtime.batching.Engine) and stream the results back.

Ray is imported only here, so the rest of Sparrow does not need it (`pip install "ray[data]"`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from .batch_job import Result
from .batching import Request
from .native import SamplerParams

BLOCK = 16  # requests per block an actor takes at a time


class _Worker:
    """A Ray Data actor: the model and one engine, loaded once per actor."""

    def __init__(self, model_path: str, n_seq: int, n_ctx: int, n_threads: int):
        from .batching import Engine
        from .native import Model

        self.model = Model(model_path)
        self.engine = Engine(self.model, n_seq=n_seq, n_ctx=n_ctx, n_batch=max(64, n_seq), n_threads=n_threads)

    def __call__(self, block: dict[str, Any]) -> dict[str, list]:
        from .batch_job import engine_results

        requests = []
        for line, spec in zip(block["line"], block["request"]):
            d = json.loads(str(spec))
            requests.append(Request(prompt=d["prompt"], max_tokens=d["max_tokens"], params=SamplerParams(**d["params"]),
                                    stop=tuple(d["stop"]), tag=int(line)))
        out: dict[str, list] = {"line": [], "text": [], "finish_reason": [], "prompt_tokens": [],
                                "completion_tokens": []}
        for r in engine_results(self.engine, requests):
            for key, value in asdict(r).items():
                out[key].append(value)
        return out


def ray_results(address: str | None, model_path: str, requests: list[Request], *, n_seq: int, n_ctx: int,
                n_threads: int, actors: int = 1) -> Iterator[Result]:
    """Run requests on the Ray cluster at address (None: start a local one), yielding each block's results as it
    finishes. Each of `actors` actors reserves n_threads CPUs."""
    try:
        import ray
    except ImportError:
        raise RuntimeError('--ray needs Ray: pip install "ray[data]"') from None
    started = not ray.is_initialized()
    if started:
        extra = {}
        if address and address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            extra["_node_ip_address"] = "127.0.0.1"  # a cluster on this machine's loopback: join it from there
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR", **extra)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [{"line": r.tag, "request": json.dumps({"prompt": r.prompt, "max_tokens": r.max_tokens,
                                                       "params": asdict(r.params), "stop": list(r.stop)})}
                for r in requests]  # one scalar column per field: the request as JSON
        ds = ray.data.from_items(rows, override_num_blocks=max(1, (len(rows) + BLOCK - 1) // BLOCK))
        out = ds.map_batches(_Worker, fn_constructor_args=(model_path, n_seq, n_ctx, n_threads), batch_size=BLOCK,
                             compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=n_threads)
        for row in out.iter_rows():
            yield Result(int(row["line"]), str(row["text"]), str(row["finish_reason"]), int(row["prompt_tokens"]),
                         int(row["completion_tokens"]))
    finally:
        if started:
            ray.shutdown()
