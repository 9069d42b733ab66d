"""State stores: per-session anchors (memory, Redis) and hardened mode's cross-session index."""
