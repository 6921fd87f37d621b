"""The streaming runtime: messages and codec, transport, node base class, graph, launcher,
profiler and a test harness. Knows nothing of instruments; never imports nodes/ or models/."""
