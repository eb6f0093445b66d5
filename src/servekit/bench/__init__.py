"""``servekit bench``: load an OpenAI-compatible server the way ``vllm bench serve`` does."""
