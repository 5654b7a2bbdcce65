"""llm_service entry point: `python -m llm_service --checkpoint DIR --port N`."""

import asyncio
import logging

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from llm_service.server import LLMServicer
from mmserve.cli import check_port_free, debug_requested, startup_errors
from mmserve.grpc_util import BindError, serve, serve_metrics
from mmserve.proto import llm_pb2, llm_pb2_grpc


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s llm %(levelname)s %(message)s")
    argv, debug = debug_requested(argv)
    # A bad setting, checkpoint or busy port is one line and exit code 2, found before any weights load
    # where it can be (MMSERVE_DEBUG=1 / --debug for the traceback).
    with startup_errors("llm_service", debug):
        config = LLMConfig.from_args(argv)
        check_port_free(config.host, config.port, "LLM_PORT")
        engine = Engine(load_language_model(config), config.engine_config())
    if config.metrics_port:
        serve_metrics(config.metrics_port, config.host, engine.metrics.registry)
    servicer = LLMServicer(engine)
    try:
        _serve(servicer, engine, config)
    except BindError:  # the port was taken while the model loaded
        engine.stop()
        with startup_errors("llm_service", debug):
            raise


def _serve(servicer, engine, config) -> None:
    asyncio.run(
        serve(
            lambda server: llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, server),
            llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name,
            config.host,
            config.port,
            config.max_message_bytes,
            on_stop=engine.stop,
            liveness=engine.is_alive,
            grace_seconds=config.drain_timeout_s,
        )
    )


if __name__ == "__main__":
    main()
