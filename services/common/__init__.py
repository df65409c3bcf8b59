"""Code shared by every Inlaid service: config helpers, model loading, Redis, gRPC."""
