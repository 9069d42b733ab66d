"""Thin adapters from wire protocols (gRPC, REST) to the data plane; they decide nothing."""
