"""Code shared by mmserve's three processes: wire types, tensor codec, checkpoint reading, gRPC plumbing."""
