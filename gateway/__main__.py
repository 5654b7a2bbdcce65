"""gateway entry point: `python -m gateway --vision ADDR --llm ADDR --checkpoint DIR --port N` (port 0: the
OS picks one, printed in the ready line)."""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys

import uvicorn
from fastapi import FastAPI

from gateway.clients import GrpcLLMClient, GrpcVisionClient
from gateway.config import GatewayConfig
from gateway.drain import Drain
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.serving import ServingCore
from mmserve.cli import StartupError, check_port_free, debug_requested, startup_errors
from mmserve.families import adapter, detect_family
from mmserve.internal_auth import log_state
from mmserve.sampling import GenerationDefaults

# mmserve.supervisor starts the gateway with the backends still binding their ports (port 0): with this
# flag the gateway loads its tokenizer meanwhile, then reads their addresses as one JSON line on stdin.
BACKENDS_ON_STDIN = "--backends-on-stdin"
GENERATE_DEADLINE_MARGIN_S = 5.0
# After a drain that had connections open: how long the process stays before exiting, so that the last
# events its streams wrote reach their readers (in a container, the published port's forwarder and the
# network go away with the process; compose-test saw a drained stream cut mid-event once without it).
DRAIN_LINGER_S = 1.0


def load_prompt(config: GatewayConfig):
    """The family's prompt adapter (loads the tokenizer and chat template)."""
    family = detect_family(config.checkpoint, config.model_type)
    return adapter(family, "prompt")(
        config.checkpoint, config.tokenizer_path or config.checkpoint, chat_template=config.chat_template
    )


def read_backends(config: GatewayConfig) -> GatewayConfig:
    """`config` with the vision and LLM addresses of the JSON line on stdin."""
    line = sys.stdin.readline()
    if not line:
        raise StartupError(f"{BACKENDS_ON_STDIN}: stdin closed before the backend addresses came")
    addresses = json.loads(line)
    return dataclasses.replace(config, vision_addr=addresses["vision"], llm_addr=addresses["llm"])


def build_app(config: GatewayConfig, prompt) -> tuple[FastAPI, ServingCore]:
    vision, llm = backend_clients(config)
    defaults = GenerationDefaults.from_checkpoint(config.checkpoint)
    core = ServingCore(
        prompt, vision, llm, MediaFetcher(config.media), config.max_images_per_request, defaults
    )
    backends = {"vision": vision.pool, "llm": llm.pool}
    app = create_app(
        core,
        config.model_name or "mmserve",
        config.api_key,
        backends,
        max_request_bytes=config.max_request_bytes,
        max_pending_requests=config.max_pending_requests,
        request_timeout_s=config.request_timeout_s,
    )
    return app, core


def backend_clients(config: GatewayConfig) -> tuple[GrpcVisionClient, GrpcLLMClient]:
    """The gRPC clients, their deadlines derived from the request timeout: a vision call gets at most
    the request's time; a generation's deadline comes a little after the gateway's own timeout (which
    answers with a clear message first), so that the LLM service also stops it if the gateway cannot."""
    timeout = config.request_timeout_s or None
    vision_s = min(config.backend_timeout_s, timeout or config.backend_timeout_s)
    generate_s = None if timeout is None else timeout + GENERATE_DEADLINE_MARGIN_S
    token = config.internal_token
    log_state(token, "every call to the vision and LLM services carries it")
    vision = GrpcVisionClient(config.vision_addr, config.max_message_bytes, vision_s, token=token)
    llm = GrpcLLMClient(
        config.llm_addr,
        config.max_message_bytes,
        generate_s,
        token=token,
        policy=config.llm_routing,
        max_imbalance=config.llm_routing_max_imbalance,
    )
    return vision, llm


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which ends the process with code
    143/130; a clean, requested shutdown exits 0 instead (what `docker compose down` expects).

    On the signal uvicorn stops accepting connections and waits for the open ones; the serving core's
    drain ends generations still running after `drain_timeout_s` with an error event, a little before
    uvicorn's own deadline would cut them silently."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain, self.drain_timeout_s = drain, drain_timeout_s
        self.connections_at_signal = 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        port = self.servers[0].sockets[0].getsockname()[1]  # the bound one, also when asked for port 0
        print(f"gateway ready on http://{self.config.host}:{port}", flush=True)

    def handle_exit(self, sig, frame) -> None:
        if not self.drain.started:
            self.connections_at_signal = len(self.server_state.connections)
        self.drain.start(self.drain_timeout_s)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    argv, debug = debug_requested(argv)
    wait_for_backends = BACKENDS_ON_STDIN in argv
    with startup_errors("gateway", debug):  # one line + exit 2, before the tokenizer loads
        config = GatewayConfig.from_args([a for a in argv if a != BACKENDS_ON_STDIN])
        check_port_free(config.host, config.port, "PORT")
        prompt = load_prompt(config)
        if wait_for_backends:
            config = read_backends(config)

    async def serve():
        with startup_errors("gateway", debug):
            app, core = build_app(config, prompt)  # inside the loop: grpc.aio channels bind to it
        server = _Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                # uvicorn's hard stop comes after the drain has ended what was left, cleanly
                timeout_graceful_shutdown=config.drain_timeout_s + 3,
            ),
            core.drain,
            config.drain_timeout_s,
        )
        await server.serve()
        if server.connections_at_signal:
            await asyncio.sleep(DRAIN_LINGER_S)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
    # The shutdown was clean: every response sent, the backends' channels closed. Exiting here skips the
    # interpreter's join of what threads are left (a getaddrinfo of a replica check, stuck while a
    # container's DNS goes away), which must not hold the process past its stop grace period.
    with contextlib.suppress(Exception):  # a closed pipe must not keep the process from exiting
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)
