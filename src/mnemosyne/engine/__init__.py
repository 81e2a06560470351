"""The engine core: the step loop, output processing, and the LLM API on top."""
