#!/usr/bin/env python3
"""Checks a Kiln daemon with the reference gRPC clients (grpcio's health and
reflection stubs): prints one JSON object with what they saw.

usage: grpc_probe.py SOCKET
"""
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main() -> None:
    channel = grpc.insecure_channel(
        "unix://" + sys.argv[1], options=[("grpc.default_authority", "localhost")]
    )
    health = health_pb2_grpc.HealthStub(channel)
    statuses = {}
    for service in ["", "kiln.v1.Jobs", "kiln.v1.ContentStore", "kiln.v1.Attestations"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # grpcio's reflection client speaks v1alpha; the daemon serves v1 and v1alpha.
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    services = []
    for reply in stub.ServerReflectionInfo(iter([request]), timeout=10):
        services = [s.name for s in reply.list_services_response.service]
    print(json.dumps({"health": statuses, "services": sorted(services)}))


if __name__ == "__main__":
    main()
