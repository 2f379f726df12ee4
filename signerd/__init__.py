"""signerd: a gRPC daemon that keeps TUF / Docker Content Trust keys on PKCS#11 tokens."""
