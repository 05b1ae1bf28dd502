"""Layer 3: the stages. Each is a function of a run folder; none imports the orchestration or the front ends."""
