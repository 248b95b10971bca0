"""The data plane's processes: one worker per core (REGCACHE_DATAPLANE_WORKERS), each an aiohttp
server on the same port (SO_REUSEPORT: the kernel spreads connections over them), under one
parent that starts them, stops them on SIGTERM or SIGINT, and stops them all if one dies. They
die with it (SIGKILL included), as it dies with `regcache up`."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable

from aiohttp import web

from ..cluster.link import RedisLink
from ..cluster.reads import ClusterReads
from ..config import Config
from ..objectstore.copies import COPIES_DIR, remove_unfinished
from ..stack.parent_death import dies_with_this_process
from .grants import GrantSigner, grant_key
from .records import RecordSender, records_socket
from .server import make_app

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # seconds a worker's transfers get to finish after SIGTERM
RECORDS_FLUSH_TIMEOUT = 2.0


def run_workers(config: Config, on_ready: Callable[[], None] = lambda: None) -> int:
    """Run the workers until SIGTERM or SIGINT (then 0) or until one of them exits (then 1);
    `on_ready()` is called once every worker serves."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # fork: the parent runs no threads and no event loop yet; spawn would add a resource tracker process
    context = multiprocessing.get_context("fork")
    if config.s3.copies_max_disk and (removed := remove_unfinished(config.data_dir / COPIES_DIR)):
        logger.warning("removed %d unfinished local copies: their writers died", removed)
    serving = context.Semaphore(0)  # each worker releases it once its port is open
    workers = [context.Process(target=serve, args=(config, serving, dies_with_this_process()), name=f"regcache-dataplane-{n}")
               for n in range(config.dataplane.workers)]
    for worker in workers:
        worker.start()
    status, starting = 0, len(workers)
    while not stop.wait(0.2):
        if failed := next((w for w in workers if w.exitcode is not None), None):
            logger.error("worker %s exited with status %s; stopping the data plane", failed.name, failed.exitcode)
            status = 1
            break
        while starting and serving.acquire(block=False):
            starting -= 1
            if not starting:
                on_ready()
    for worker in workers:
        if worker.exitcode is None:
            worker.terminate()
    for worker in workers:
        worker.join(STOP_TIMEOUT + RECORDS_FLUSH_TIMEOUT + 1)
        if worker.exitcode is None:
            worker.kill()
            worker.join()
    return status


def serve(config: Config, serving, end_with_parent: Callable[[], None]) -> None:
    """One worker: serve until SIGTERM or SIGINT; `serving` is released once it does."""
    end_with_parent()
    for signum in (signal.SIGINT, signal.SIGTERM):  # not the parent's handlers: until serving, a signal ends it
        signal.signal(signum, signal.SIG_DFL)
    configure_logging()
    try:
        asyncio.run(_serve(config, serving))
    except OSError as e:  # the port is taken, the data dir unwritable, ...
        logger.error("%s", e)
        sys.exit(1)


async def _serve(config: Config, serving) -> None:
    dataplane = config.dataplane
    records = RecordSender(records_socket(config.data_dir))
    sending = asyncio.create_task(records.run())
    link = reads = None
    if config.cluster is not None:
        link = RedisLink(config.cluster.redis_url, config.cluster.redis_timeout, quiet=True)
        reads = ClusterReads(link)
    runner = web.AppRunner(make_app(config, GrantSigner(grant_key(config)), records, records.store_down, reads),
                           access_log=None, shutdown_timeout=STOP_TIMEOUT, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, dataplane.host or None, dataplane.port, reuse_port=True).start()
        serving.release()
        await stop.wait()
    finally:
        await runner.cleanup()
        await records.flush(RECORDS_FLUSH_TIMEOUT)
        sending.cancel()
        if link is not None:
            reads.close()
            await link.close()


def configure_logging() -> None:
    # logging's StreamHandler flushes each line: nothing waits in a buffer when stderr is a pipe.
    logging.basicConfig(level=logging.WARNING, format="regcache data plane: %(message)s", stream=sys.stderr)
