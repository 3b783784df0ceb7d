from grpc_health.v1 import health_pb2, health_pb2_grpc

import etcdisco
import etcdisco.grpc

with (
    etcdisco.Client() as client,  # $ETCDISCO_ENDPOINTS or 127.0.0.1:2379
    etcdisco.grpc.channel(client, "greeter", idempotent=True) as channel,
):
    stub = health_pb2_grpc.HealthStub(channel)  # any generated stub works on the channel
    for _ in range(3):
        reply = stub.Check(health_pb2.HealthCheckRequest(service="greeter"), timeout=5)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
