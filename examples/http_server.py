from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import etcdisco.uvicorn


async def me(request: Request) -> JSONResponse:
    registration = request.app.state.etcdisco  # what etcdisco registered for this server
    return JSONResponse({"user": "me", "served_by": registration.address})


app = Starlette(routes=[Route("/v1/me", me)])

if __name__ == "__main__":  # registered as "users" once uvicorn listens; SIGTERM drains first
    etcdisco.uvicorn.run(app, "users", port=0, health_path="/healthz")  # port 0: any free port
