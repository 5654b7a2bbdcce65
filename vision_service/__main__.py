"""vision_service entry point: `python -m vision_service --checkpoint DIR --port N` (port 0: the OS picks
one, printed in the ready line)."""

from mmserve.cli import check_port_free
from mmserve.proto import vision_pb2, vision_pb2_grpc
from mmserve.service_main import LoadedService, run_grpc_service
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder
from vision_service.server import VisionServicer


def load(argv: list[str]) -> LoadedService:
    config = VisionConfig.from_args(argv)
    check_port_free(config.host, config.port, "VISION_PORT")  # before the weights load
    encoder = VisionEncoder(config)
    servicer = VisionServicer(encoder)
    return LoadedService(
        settings=config,
        service_name=vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name,
        add_servicer=lambda server: vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server),
        metrics_registry=encoder.metrics.registry,
        on_stop=encoder.close,
        liveness=encoder.is_alive,
    )


def main(argv=None) -> None:
    run_grpc_service("vision_service", load, argv)


if __name__ == "__main__":
    main()
