"""Gateway service: validates requests, queues them in Redis, streams tokens back."""
