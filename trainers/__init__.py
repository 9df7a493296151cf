"""Training loops run inside Ray actors and Ray Train workers."""
