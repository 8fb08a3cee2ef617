"""A generic gRPC client we did not write (Python grpcio) discovers the
viewer-api through server reflection alone, checks health, logs in and
lists the worklist with dynamically built messages.

usage: reflection_client.py HOST:PORT USERNAME PASSWORD
Prints one JSON line with what it found.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def unary(channel, pool, method_path, request_dict, metadata=()):
    service_name, method_name = method_path.rsplit("/", 1)
    method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    request = json_format.ParseDict(request_dict, req_cls())
    return json_format.MessageToDict(call(request, metadata=metadata, timeout=10))


def main():
    target, username, password = sys.argv[1:4]
    channel = grpc.insecure_channel(target)
    reflection_db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(reflection_db.get_services())
    pool = descriptor_pool.DescriptorPool(reflection_db)

    health = health_pb2_grpc.HealthStub(channel)
    overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    images = health.Check(
        health_pb2.HealthCheckRequest(service="consortium.v1.ImageService"), timeout=10
    )

    login = unary(
        channel,
        pool,
        "consortium.v1.IdentityService/Login",
        {"username": username, "password": password},
    )
    token = login["token"]
    worklist = unary(
        channel,
        pool,
        "consortium.v1.WorklistService/ListWorklist",
        {"limit": 10},
        metadata=(("authorization", f"Bearer {token}"),),
    )
    try:
        unary(channel, pool, "consortium.v1.WorklistService/ListWorklist", {})
        unauthenticated = "no error"
    except grpc.RpcError as e:
        unauthenticated = e.code().name

    print(
        json.dumps(
            {
                "services": services,
                "health": health_pb2.HealthCheckResponse.ServingStatus.Name(overall.status),
                "image_health": health_pb2.HealthCheckResponse.ServingStatus.Name(images.status),
                "role": login["user"]["role"],
                "items": len(worklist.get("items", [])),
                "first_status": (worklist.get("items") or [{}])[0].get("status"),
                "without_token": unauthenticated,
            }
        )
    )


if __name__ == "__main__":
    main()
