import asyncio

import etcdisco
import etcdisco.grpc


async def main() -> None:
    async with etcdisco.AsyncClient() as client:  # $ETCDISCO_ENDPOINTS or 127.0.0.1:2379
        server = etcdisco.grpc.aio_server()  # grpc.aio.server() + health service + drain
        # add_GreeterServicer_to_server(Greeter(), server)  # your servicers go here
        port = server.add_insecure_port("[::]:0")  # any free port: the registry tells clients
        served = await etcdisco.grpc.aio_serve_registered(
            client, server, "greeter", port=port, handle_signals=True
        )
        print("serving greeter at", served.address, flush=True)
        await served.wait_for_termination()  # SIGTERM: drain, deregister, stop


asyncio.run(main())
