"""llm_service entry point: `python -m llm_service --checkpoint DIR --port N` (port 0: the OS picks one,
printed in the ready line)."""

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from llm_service.server import LLMServicer
from mmserve.cli import check_port_free
from mmserve.proto import llm_pb2, llm_pb2_grpc
from mmserve.service_main import LoadedService, run_grpc_service


def load(argv: list[str]) -> LoadedService:
    config = LLMConfig.from_args(argv)
    check_port_free(config.host, config.port, "LLM_PORT")  # before the weights load
    engine = Engine(load_language_model(config), config.engine)
    servicer = LLMServicer(engine)
    return LoadedService(
        settings=config,
        service_name=llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name,
        add_servicer=lambda server: llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, server),
        metrics_registry=engine.metrics.registry,
        on_stop=engine.stop,
        liveness=engine.is_alive,
    )


def main(argv=None) -> None:
    run_grpc_service("llm_service", load, argv)


if __name__ == "__main__":
    main()
