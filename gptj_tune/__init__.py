"""gptj-tune: fine-tune the EleutherAI GPT-J / GPT-Neo family from a YAML recipe."""

__version__ = "0.1.0"
