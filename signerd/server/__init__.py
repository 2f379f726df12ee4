"""gRPC server: the only package that imports grpc on the daemon side."""
