"""`python -m kvbuffer.service.server.health_check TARGET`: exit 0 when the server's grpc.health.v1 answers SERVING.

Kubernetes' native gRPC probe speaks no TLS, so pods serving TLS probe with this command instead; the Helm chart's
test pod runs it too. Exit codes: 0 SERVING, 1 anything else (the reason on one line of stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbuffer.v1 import SERVICE_NAME


def check(target: str, *, ca_file: Path | None = None, server_name: str | None = None, timeout_s: float = 5.0) -> str:
    """The health status name of SERVICE_NAME at target (TLS when ca_file is given, its certificate checked for
    server_name when given, else for the target's host)."""
    if ca_file is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_file.read_bytes()), options=options)
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                             timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbuffer.service.server.health_check", description=__doc__)
    parser.add_argument("target", help="server address, host:port")
    parser.add_argument("--ca-file", type=Path, help="PEM root certificate(s): connect over TLS, verified by these")
    parser.add_argument("--server-name", help="name the server's certificate must carry (default: the target's host)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of the check (default 5)")
    args = parser.parse_args(argv)
    if args.ca_file is not None and not args.ca_file.is_file():
        print(f"health_check: error: --ca-file {args.ca_file}: no such file", file=sys.stderr)
        return 2
    try:
        status = check(args.target, ca_file=args.ca_file, server_name=args.server_name, timeout_s=args.timeout_s)
    except grpc.RpcError as exc:
        print(f"health_check: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
