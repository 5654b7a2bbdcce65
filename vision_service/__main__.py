"""vision_service entry point: `python -m vision_service --checkpoint DIR --port N`."""

import asyncio
import logging

from mmserve.cli import check_port_free, debug_requested, startup_errors
from mmserve.grpc_util import BindError, serve, serve_metrics
from mmserve.proto import vision_pb2, vision_pb2_grpc
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder
from vision_service.server import VisionServicer


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vision %(levelname)s %(message)s")
    argv, debug = debug_requested(argv)
    # A bad setting, checkpoint or busy port is one line and exit code 2, found before any weights load
    # where it can be (MMSERVE_DEBUG=1 / --debug for the traceback).
    with startup_errors("vision_service", debug):
        config = VisionConfig.from_args(argv)
        check_port_free(config.host, config.port, "VISION_PORT")
        encoder = VisionEncoder(config)
    if config.metrics_port:
        serve_metrics(config.metrics_port, config.host, encoder.metrics.registry)
    servicer = VisionServicer(encoder)
    try:
        _serve(servicer, encoder, config)
    except BindError:  # the port was taken while the model loaded
        encoder.close()
        with startup_errors("vision_service", debug):
            raise


def _serve(servicer, encoder, config) -> None:
    asyncio.run(
        serve(
            lambda server: vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server),
            vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name,
            config.host,
            config.port,
            config.max_message_bytes,
            on_stop=encoder.close,
            grace_seconds=config.drain_timeout_s,
        )
    )


if __name__ == "__main__":
    main()
