"""The kvbuffer.v1 gRPC API: messages (`kvbuffer_pb2`) and service stubs (`kvbuffer_pb2_grpc`), generated
from kvbuffer.proto by `python proto/generate.py`."""

from kvbuffer.v1 import kvbuffer_pb2

SERVICE_NAME: str = kvbuffer_pb2.DESCRIPTOR.services_by_name["KVBufferService"].full_name  # for health checks
