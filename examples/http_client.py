import etcdisco
import etcdisco.http

with (
    etcdisco.Client() as registry,  # $ETCDISCO_ENDPOINTS or 127.0.0.1:2379
    etcdisco.http.Client(registry, services=["users"], timeout=5) as http,  # an httpx.Client
):
    for _ in range(3):
        reply = http.get("http://users/v1/me")  # each request: a live instance of "users"
        print(reply.status_code, reply.json())
