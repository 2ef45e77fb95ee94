"""Models: the registry, loading (hub, GGUF, checkpoint folder, random config), architecture access, loading
options and memory planning. Custom architectures are registered with transformers here."""
