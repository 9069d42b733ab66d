"""The protocol-agnostic data plane: identity, judgment in order, one forward, padding."""
