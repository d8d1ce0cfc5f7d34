"""Where jobs run: in this process one at a time, in N local worker processes, or on a Ray cluster.

All three share one small interface the driver (study/run.py) schedules through: `submit` a call,
`wait` for some to finish. The driver decides what is ready (parents done, lock taken); an
executor only runs calls.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures

from taxon.errors import TaxonError

# Environment a worker on another machine needs to find data, cache and tracking settings.
FORWARDED_ENV = ("TAXON_DATA_DIR", "TAXON_CARDS_DIR", "TAXON_CACHE_DIR", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "HF_HOME", "PYTHONPATH")


class Sequential:
    """Runs each call at once, in this process (the default): nothing to start, nothing to ship."""

    name, slots = "sequential", 1

    def __init__(self) -> None:
        self._done: list[Future] = []

    def submit(self, fn: Callable, *args, gpus: float = 0) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the driver like a worker's error
            future.set_exception(e)
        return future

    def wait(self, handles: list, timeout: float | None = None) -> list:
        return list(handles)

    def result(self, handle: Future):
        return handle.result()

    def shutdown(self) -> None:
        pass


def _die_with_parent() -> None:
    """A worker must not outlive a killed driver: it would go on writing a checkpoint whose lock
    the driver's death released. Linux only; elsewhere workers end when their queue closes."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(gpu_ids, threads: int) -> None:
    _die_with_parent()
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())
    import torch

    torch.set_num_threads(threads)


class LocalPool:
    """N worker processes on this machine (spawned, so no torch state is forked). With GPUs, each
    worker owns one (round robin); on CPU the cores are split between workers."""

    name = "local"

    def __init__(self, workers: int):
        import torch

        self.slots = workers
        ctx = mp.get_context("spawn")
        gpu_ids = None
        if torch.cuda.is_available():
            gpu_ids = ctx.Manager().Queue()
            for i in range(workers):
                gpu_ids.put(i % torch.cuda.device_count())
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(gpu_ids, threads))

    def submit(self, fn: Callable, *args, gpus: float = 0) -> Future:
        return self.pool.submit(fn, *args)

    def wait(self, handles: list, timeout: float | None = None) -> list:
        done, _ = wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, handle: Future):
        return handle.result()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Ray:
    """Jobs as Ray tasks. A local cluster is started unless `address` names one. On a cluster the
    stage cache (TAXON_CACHE_DIR) must be a folder every node sees (a shared file system); the
    store stays with the driver, which alone writes it. Each job asks for `gpus` GPUs (default: 1
    when the cluster has any), so Ray gives each stage its own device."""

    name = "ray"
    slots = 10_000  # Ray queues tasks by their resources itself

    def __init__(self, address: str | None = None, workers: int | None = None,
                 gpus: float | None = None):
        try:
            import ray
        except ImportError as e:
            raise TaxonError("--executor ray needs the optional extra: pip install 'taxon[ray]'") from e
        self.ray = ray
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update({k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "WANDB_"))})
        kw = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
        try:
            ray.init(runtime_env={"env_vars": env}, log_to_driver=True, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise TaxonError(f"cannot start or reach Ray{' at ' + address if address else ''}: "
                             f"{str(e).splitlines()[0]}; check --address or `ray status`") from e
        self.gpus = gpus if gpus is not None else (1 if ray.cluster_resources().get("GPU") else 0)

    def submit(self, fn: Callable, *args, gpus: float = 0):
        task = self.ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=0)(fn)
        return task.remote(*args)

    def wait(self, handles: list, timeout: float | None = None) -> list:
        done, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def result(self, handle):
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def shutdown(self) -> None:
        self.ray.shutdown()


def check(executor: str, workers: int = 1, address: str | None = None,
          gpus: float | None = None) -> None:
    """The executor options, checked before anything is written or started."""
    if executor not in ("local", "ray"):
        raise TaxonError(f"unknown executor '{executor}': use local or ray")
    if executor == "local" and address is not None:
        raise TaxonError("--address is for --executor ray; drop it or add --executor ray")
    if workers < 1:
        raise TaxonError(f"--workers {workers}: give 1 or more")
    if gpus is not None and gpus < 0:
        raise TaxonError(f"--gpus {gpus}: give 0 or more")


def make(executor: str, workers: int = 1, address: str | None = None, gpus: float | None = None):
    check(executor, workers, address, gpus)
    if executor == "ray":
        return Ray(address, workers if workers > 1 else None, gpus)
    return Sequential() if workers == 1 else LocalPool(workers)
